//! The OpenAPI document made whole: what every operation can answer
//! besides what its handler declares (the extractors' and the middleware's
//! errors: 401 and 403 wherever a token is needed, 400/413/415/422 where a
//! body or parameters are read, 429 and 503 from the tenant gate and the
//! token check), all as `application/problem+json`, and the constraints
//! the handlers check on path and query parameters. Done once, on the
//! generated document, so that no handler can forget it.

use serde_json::{Map, Value, json};

use crate::domain::ids::{RECORD_PATTERN, RESOURCE_PATTERN, TENANT_PATTERN};
use crate::plugins::manifest::NAME_PATTERN;

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];
const PROBLEM_REF: &str = "#/components/schemas/Problem";

/// The document as served.
pub fn complete(doc: &utoipa::openapi::OpenApi) -> Value {
    let mut doc = serde_json::to_value(doc).unwrap_or_default();
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for (path, item) in paths.iter_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for (method, op) in item.iter_mut() {
                if METHODS.contains(&method.as_str()) {
                    complete_operation(path, op);
                }
            }
        }
    }
    constrain_components(&mut doc);
    doc
}

/// The checks handlers make on body fields, written into their schemas.
fn constrain_components(doc: &mut Value) {
    let schemas = &mut doc["components"]["schemas"];
    if let Some(id) = schemas["CreateTenant"]["properties"]["id"].as_object_mut() {
        pattern(id, TENANT_PATTERN);
    }
}

fn complete_operation(path: &str, op: &mut Value) {
    let authenticated = op
        .get("security")
        .and_then(Value::as_array)
        .is_some_and(|s| !s.is_empty());
    let has_body = op.get("requestBody").is_some();
    let mut has_params = false;
    if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
        for param in params.iter_mut() {
            has_params |= matches!(param["in"].as_str(), Some("path" | "query"));
            constrain(path, param);
        }
    }
    let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
        return;
    };
    for response in responses.values_mut() {
        as_problem_json(response);
    }
    let mut add = |status: &str, description: &str| {
        responses
            .entry(status.to_owned())
            .or_insert_with(|| problem_response(description));
    };
    if has_params || has_body {
        add(
            "400",
            "The request is malformed: a parameter, header or body the detail names",
        );
    }
    if authenticated {
        add(
            "401",
            "No bearer token, or one that is not valid (expired, wrong signature or audience)",
        );
        add(
            "403",
            "The token's roles or tenant do not allow this operation",
        );
        add(
            "429",
            "The tenant is over a rate limit; Retry-After says when to try again",
        );
        add(
            "503",
            "A service this request needs (the Auth Service, the database) is unavailable; Retry-After says when to try again",
        );
    }
    if path.contains('{') {
        add(
            "404",
            "What the path names does not exist (for this tenant)",
        );
    }
    if has_body {
        add(
            "408",
            "The request body did not arrive within the body deadline",
        );
        add("413", "The request body is larger than the limit");
        add("415", "The request body's Content-Type is not accepted");
        add(
            "422",
            "The body is well-formed but not acceptable; `errors` names each problem",
        );
    }
}

/// A response whose body is a problem document is served as
/// `application/problem+json`, not `application/json`.
fn as_problem_json(response: &mut Value) {
    let Some(content) = response.get_mut("content").and_then(Value::as_object_mut) else {
        return;
    };
    let is_problem = content
        .get("application/json")
        .is_some_and(|c| c["schema"]["$ref"] == PROBLEM_REF);
    if is_problem && let Some(json) = content.remove("application/json") {
        content.insert("application/problem+json".into(), json);
    }
}

fn problem_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": PROBLEM_REF}}}
    })
}

/// The checks a handler makes on a parameter, written into its schema.
fn constrain(path: &str, param: &mut Value) {
    let name = param["name"].as_str().unwrap_or_default().to_owned();
    let location = param["in"].as_str().unwrap_or_default().to_owned();
    let Some(schema) = param.get_mut("schema").and_then(Value::as_object_mut) else {
        return;
    };
    if location == "header" {
        // An absent header is not a null one.
        schema.insert("type".into(), json!("string"));
    }
    match (location.as_str(), name.as_str()) {
        ("header", "If-Match") => pattern(schema, IF_MATCH_PATTERN),
        ("header", "Idempotency-Key") => pattern(schema, r"^[!-~]([ -~]{0,253}[!-~])?$"),
        ("query", "select") => pattern(schema, SELECT_PATTERN),
        ("query", "after" | "cursor") => {
            schema.insert("minLength".into(), json!(1));
        }
        ("path", "resource") => pattern(schema, RESOURCE_PATTERN),
        ("path", "id") if path.starts_with("/v1/data/") => pattern(schema, RECORD_PATTERN),
        ("path", "id") if path.starts_with("/v1/tenants/") => pattern(schema, TENANT_PATTERN),
        ("path", "name") if path.starts_with("/v1/plugins/") => pattern(schema, NAME_PATTERN),
        ("path", "version") => {
            schema.insert("minimum".into(), json!(1));
        }
        ("query", "limit") => {
            schema.insert("minimum".into(), json!(1));
            schema.insert("maximum".into(), json!(super::MAX_PAGE));
        }
        _ => {}
    }
}

/// `*`, or one ETag (a weak one is accepted and never matches); RFC 9110's
/// `etagc` without obs-text (header values are ASCII here). Empty: as if
/// absent.
const IF_MATCH_PATTERN: &str = r#"^(|\*|(W/)?"[!#-~]*")$"#;

/// The fields `select` may name.
const SELECT_PATTERN: &str = r"^(id|resource|version|createdAt|updatedAt|data(\.[^.,]+)*)(,(id|resource|version|createdAt|updatedAt|data(\.[^.,]+)*))*$";

fn pattern(schema: &mut Map<String, Value>, pattern: &str) {
    schema.insert("pattern".into(), json!(pattern));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document() -> Value {
        let (_, doc) = super::super::routes(true);
        complete(&doc)
    }

    #[test]
    fn errors_are_problem_documents_and_authenticated_operations_say_401_and_403() {
        let doc = document();
        let mut checked = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if !METHODS.contains(&method.as_str()) {
                    continue;
                }
                let responses = op["responses"].as_object().unwrap();
                for (status, response) in responses {
                    if (status.starts_with('4') || status.starts_with('5'))
                        && let Some(content) = response.get("content")
                    {
                        assert!(
                            content.get("application/json").is_none()
                                || path.starts_with("/health"),
                            "{method} {path} {status}: {content}"
                        );
                    }
                }
                if op.get("security").is_some() {
                    assert!(responses.contains_key("401"), "{method} {path}");
                    assert!(responses.contains_key("403"), "{method} {path}");
                    checked += 1;
                }
            }
        }
        assert!(checked > 30, "{checked}");
    }

    #[test]
    fn parameters_carry_the_checks_the_handlers_make() {
        let doc = document();
        let params = doc["paths"]["/v1/data/{resource}"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .clone();
        let find = |name: &str| params.iter().find(|p| p["name"] == name).unwrap().clone();
        assert_eq!(find("resource")["schema"]["pattern"], RESOURCE_PATTERN);
        assert_eq!(find("limit")["schema"]["maximum"], super::super::MAX_PAGE);
    }
}
