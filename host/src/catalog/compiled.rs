//! A compiled resource schema: the JSON Schema validator plus what the query
//! layer needs to know about fields (type, `x-index`, `x-encrypted`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::error::FieldError;

/// How a field compares in SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    Text,
    Numeric,
    Boolean,
    /// Objects, arrays and fields of mixed type: compared as their text.
    Other,
}

impl FieldType {
    fn from_schema(schema: &Value) -> Self {
        let types: Vec<&str> = match schema.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let non_null: Vec<&str> = types.into_iter().filter(|t| *t != "null").collect();
        match non_null.as_slice() {
            ["string"] => Self::Text,
            ["number"] | ["integer"] | ["integer", "number"] | ["number", "integer"] => {
                Self::Numeric
            }
            ["boolean"] => Self::Boolean,
            _ => Self::Other,
        }
    }
}

/// A property reachable by a dotted path (`customer.name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldInfo {
    pub path: Vec<String>,
    pub kind: FieldType,
    pub encrypted: bool,
    pub indexed: bool,
}

/// One version of a resource's schema, ready to validate and query with.
#[derive(Debug)]
pub struct CompiledSchema {
    pub version: i32,
    pub schema: Value,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    validator: jsonschema::Validator,
    fields: BTreeMap<String, FieldInfo>,
    /// Paths (object keys from the root) of the outermost `x-encrypted`
    /// fields: stored sealed, never copied into events.
    encrypted: Vec<Vec<String>>,
    /// `x-event-payload: full`: events carry the record.
    full_events: bool,
}

impl CompiledSchema {
    /// Checks a schema document against the 2020-12 meta-schema and the
    /// service's own rules, and compiles it. Errors point into the request
    /// body (`/schema/...`).
    pub fn compile(
        schema: Value,
        version: i32,
        created_at: DateTime<Utc>,
        created_by: String,
    ) -> Result<Self, Vec<FieldError>> {
        check_document(&schema)?;
        // Patterns run on the linear-time `regex` engine: no tenant's pattern
        // can backtrack for seconds (`check_document` refused those already).
        // `format` is an annotation in 2020-12; a schema asks for it to be
        // asserted with `"x-format-assertion": true` at its root.
        let assert_formats = match schema.get("x-format-assertion") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(vec![FieldError::schema(
                    "/schema/x-format-assertion",
                    "x-format-assertion is true (assert `format`) or false (the default: `format` is an annotation)",
                )]);
            }
        };
        let validator = jsonschema::draft202012::options()
            .should_validate_formats(assert_formats)
            .with_retriever(super::remotes::LocalRemotes)
            .with_pattern_options(
                jsonschema::PatternOptions::regex().size_limit(PATTERN_SIZE_LIMIT),
            )
            .build(&schema)
            .map_err(|e| vec![FieldError::schema("/schema", e.to_string())])?;
        let mut fields = BTreeMap::new();
        collect_fields(&schema, &mut Vec::new(), false, &mut fields);
        let mut encrypted = Vec::new();
        collect_encrypted(&schema, &mut Vec::new(), &mut encrypted);
        let full_events = schema.get("x-event-payload").and_then(Value::as_str) == Some("full");
        Ok(Self {
            version,
            schema,
            created_at,
            created_by,
            validator,
            fields,
            encrypted,
            full_events,
        })
    }

    /// Validates a record document; each error points into the document.
    /// Cheap for small documents; see [`document_weight`] for when to move
    /// it off the async workers.
    pub fn validate(&self, document: &Value) -> Result<(), Vec<FieldError>> {
        // Most writes are valid: the yes/no check is far cheaper than
        // walking the document for every error.
        if self.validator.is_valid(document) {
            return Ok(());
        }
        let errors: Vec<FieldError> = self
            .validator
            .iter_errors(document)
            .take(100)
            // Masked: a message never quotes the value (it may be an
            // x-encrypted one, or hold one).
            .map(|e| FieldError::schema(e.instance_path().as_str(), e.masked().to_string()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The field at a dotted path, if the schema declares it.
    pub fn field(&self, dotted: &str) -> Option<&FieldInfo> {
        self.fields.get(dotted)
    }

    pub fn indexed_fields(&self) -> impl Iterator<Item = &FieldInfo> {
        self.fields.values().filter(|f| f.indexed && !f.encrypted)
    }

    /// The outermost `x-encrypted` fields at any depth, as paths of object
    /// keys: stored sealed, never copied into events.
    pub fn encrypted_paths(&self) -> &[Vec<String>] {
        &self.encrypted
    }

    /// Whether change events carry the record (`x-event-payload: full`;
    /// the default, `keys`, carries only its keys).
    pub fn full_events(&self) -> bool {
        self.full_events
    }
}

/// The meta-schema check plus the service's rules about its extensions.
/// This is also the local fallback when the Validation Service is unavailable.
pub fn check_document(schema: &Value) -> Result<(), Vec<FieldError>> {
    if !schema.is_object() {
        return Err(vec![FieldError::schema(
            "/schema",
            "a resource schema must be a JSON object",
        )]);
    }
    if let Err(e) = jsonschema::draft202012::meta::validate(schema) {
        let at = e.instance_path().as_str();
        return Err(vec![FieldError::schema(
            format!("/schema{at}"),
            format!("not a valid JSON Schema (draft 2020-12): {e}"),
        )]);
    }
    let mut errors = Vec::new();
    check_patterns(schema, &mut "/schema".to_owned(), &mut errors);
    check_encrypted_placement(schema, &mut "/schema".to_owned(), true, 0, &mut errors);
    check_encrypted_indexes(schema, &mut "/schema".to_owned(), false, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    match schema.get("type") {
        Some(Value::String(t)) if t == "object" => {}
        _ => {
            return Err(vec![FieldError::schema(
                "/schema/type",
                "a resource schema must declare \"type\": \"object\"",
            )]);
        }
    }
    match schema.get("x-event-payload") {
        None => {}
        Some(Value::String(p)) if p == "keys" || p == "full" => {}
        Some(_) => {
            return Err(vec![FieldError::schema(
                "/schema/x-event-payload",
                "x-event-payload must be \"keys\" or \"full\"",
            )]);
        }
    }
    Ok(())
}

/// Largest compiled size of one pattern, in bytes.
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// Refuses every `pattern` and `patternProperties` key that the linear-time
/// engine cannot run (backreferences, look-around) or that compiles too
/// large, naming it by its JSON Pointer in the request body.
fn check_patterns(schema: &Value, path: &mut String, errors: &mut Vec<FieldError>) {
    let Value::Object(map) = schema else {
        if let Value::Array(items) = schema {
            for (i, item) in items.iter().enumerate() {
                within(path, &i.to_string(), |p| check_patterns(item, p, errors));
            }
        }
        return;
    };
    for (key, value) in map {
        match (key.as_str(), value) {
            ("pattern", Value::String(pattern)) => {
                within(path, key, |p| check_pattern(pattern, p, errors));
            }
            ("patternProperties", Value::Object(props)) => within(path, key, |p| {
                for (pattern, sub) in props {
                    within(p, pattern, |p| {
                        check_pattern(pattern, p, errors);
                        check_patterns(sub, p, errors);
                    });
                }
            }),
            // Instances, not schemas: a `pattern` key there is data.
            ("enum" | "const" | "default" | "examples", _) => {}
            ("properties" | "$defs" | "definitions" | "dependentSchemas", Value::Object(subs)) => {
                within(path, key, |p| {
                    for (name, sub) in subs {
                        within(p, name, |p| check_patterns(sub, p, errors));
                    }
                });
            }
            (_, Value::Object(_) | Value::Array(_)) => {
                within(path, key, |p| check_patterns(value, p, errors));
            }
            _ => {}
        }
    }
}

fn check_pattern(pattern: &str, path: &str, errors: &mut Vec<FieldError>) {
    if let Err(e) = regex::RegexBuilder::new(pattern)
        .size_limit(PATTERN_SIZE_LIMIT)
        .build()
    {
        let why = match e {
            regex::Error::CompiledTooBig(_) => "it compiles too large".to_owned(),
            other => format!("{other}")
                .lines()
                .last()
                .unwrap_or_default()
                .trim()
                .to_owned(),
        };
        errors.push(FieldError::schema(
            path,
            format!(
                "the pattern {pattern:?} cannot be used: patterns run on a linear-time engine \
                 (no backreferences or look-around), and {why}"
            ),
        ));
    }
}

/// Runs `f` with `segment` appended to the JSON Pointer `path`.
fn within(path: &mut String, segment: &str, f: impl FnOnce(&mut String)) {
    let len = path.len();
    path.push('/');
    path.push_str(&segment.replace('~', "~0").replace('/', "~1"));
    f(path);
    path.truncate(len);
}

/// A cheap measure of how much work validating a document can be: its
/// string bytes plus a few per value. Documents above
/// [`HEAVY_DOCUMENT`] are validated on a blocking thread, never on an
/// async worker.
pub fn document_weight(doc: &Value) -> usize {
    match doc {
        Value::String(s) => 8 + s.len(),
        Value::Array(items) => 8 + items.iter().map(document_weight).sum::<usize>(),
        Value::Object(map) => {
            8 + map
                .iter()
                .map(|(k, v)| k.len() + document_weight(v))
                .sum::<usize>()
        }
        _ => 8,
    }
}

/// The weight above which validation leaves the async workers.
pub const HEAVY_DOCUMENT: usize = 8 * 1024;

/// Whether a property's schema says `x-encrypted: true`.
fn is_encrypted(sub: &Value) -> bool {
    sub.get("x-encrypted") == Some(&Value::Bool(true))
}

/// Deepest `properties` nesting searched for `x-encrypted` fields.
const MAX_ENCRYPTED_DEPTH: usize = 32;

/// Walks `properties` (any names) down to the outermost `x-encrypted`
/// fields: what is sealed as one value.
/// The `x-encrypted` paths of a schema document (what
/// [`CompiledSchema::encrypted_paths`] gives once compiled).
pub fn encrypted_paths_of(schema: &Value) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    collect_encrypted(schema, &mut Vec::new(), &mut out);
    out
}

fn collect_encrypted(schema: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    if prefix.len() >= MAX_ENCRYPTED_DEPTH {
        return;
    }
    for (name, sub) in props {
        prefix.push(name.clone());
        if is_encrypted(sub) {
            out.push(prefix.clone());
        } else {
            collect_encrypted(sub, prefix, out);
        }
        prefix.pop();
    }
}

/// Refuses every `x-encrypted` that would not take effect: only `true`, on
/// a property reached from the root through `properties` alone (no `$ref`,
/// array items, combinators…), within [`MAX_ENCRYPTED_DEPTH`], is sealed;
/// anywhere else the value would be stored in clear.
fn check_encrypted_placement(
    schema: &Value,
    path: &mut String,
    reachable: bool,
    depth: usize,
    errors: &mut Vec<FieldError>,
) {
    match schema {
        Value::Object(map) => {
            if let Some(flag) = map.get("x-encrypted") {
                let ok =
                    reachable && depth > 0 && depth <= MAX_ENCRYPTED_DEPTH && flag.is_boolean();
                if !ok {
                    within(path, "x-encrypted", |p| {
                        errors.push(FieldError::schema(
                            p.as_str(),
                            "x-encrypted must be true or false, on a property reached from the root \
                             through \"properties\" only (not under $ref, $defs, items, \
                             additionalProperties, patternProperties or a combinator), at most 32 \
                             levels deep: elsewhere it would not be sealed",
                        ))
                    });
                }
            }
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("enum" | "const" | "default" | "examples", _) => {}
                    ("properties", Value::Object(props)) => within(path, key, |p| {
                        for (name, sub) in props {
                            within(p, name, |p| {
                                check_encrypted_placement(sub, p, reachable, depth + 1, errors)
                            });
                        }
                    }),
                    (_, Value::Object(_) | Value::Array(_)) => within(path, key, |p| {
                        check_encrypted_placement(value, p, false, depth + 1, errors)
                    }),
                    _ => {}
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                within(path, &i.to_string(), |p| {
                    check_encrypted_placement(item, p, false, depth, errors)
                });
            }
        }
        _ => {}
    }
}

/// Refuses `x-index` on an encrypted field or one inside it: its stored
/// value is ciphertext, which no index can order or find.
fn check_encrypted_indexes(
    schema: &Value,
    path: &mut String,
    above: bool,
    errors: &mut Vec<FieldError>,
) {
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    within(path, "properties", |p| {
        for (name, sub) in props {
            within(p, name, |p| {
                let encrypted = above || is_encrypted(sub);
                if encrypted && sub.get("x-index") == Some(&Value::Bool(true)) {
                    errors.push(FieldError::schema(
                        format!("{p}/x-index"),
                        "x-index cannot be used on an encrypted field (x-encrypted) or inside \
                         one: it is stored as ciphertext",
                    ));
                }
                check_encrypted_indexes(sub, p, encrypted, errors);
            });
        }
    });
}

/// Walks `properties` (nested objects too) and records every field whose
/// name is a plain identifier, so that dotted query paths resolve. A field
/// inside an `x-encrypted` one counts as encrypted.
fn collect_fields(
    schema: &Value,
    prefix: &mut Vec<String>,
    above: bool,
    out: &mut BTreeMap<String, FieldInfo>,
) {
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (name, sub) in props {
        if !is_plain_name(name) || prefix.len() >= 8 {
            continue;
        }
        prefix.push(name.clone());
        let encrypted = above || is_encrypted(sub);
        out.insert(
            prefix.join("."),
            FieldInfo {
                path: prefix.clone(),
                kind: FieldType::from_schema(sub),
                encrypted,
                indexed: sub.get("x-index") == Some(&Value::Bool(true)),
            },
        );
        collect_fields(sub, prefix, encrypted, out);
        prefix.pop();
    }
}

/// Field names usable in query paths and SQL literals: `[A-Za-z0-9_-]{1,63}`.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn compile(schema: Value) -> Result<CompiledSchema, Vec<FieldError>> {
        CompiledSchema::compile(schema, 1, Utc::now(), "test".into())
    }

    #[test]
    fn errors_point_into_the_document() {
        let s = compile(
            json!({"type": "object", "properties": {"total": {"type": "number", "minimum": 0}}}),
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        let errors = s.validate(&json!({"total": -1})).err().unwrap_or_default();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "/total");
        assert_eq!(errors[0].source, "schema");
    }

    #[test]
    fn format_is_an_annotation_unless_the_schema_asks_for_assertion() {
        let schema = |assert: Option<bool>| {
            let mut s = json!({"type": "object", "properties": {"email": {"type": "string", "format": "email"}}});
            if let Some(a) = assert {
                s["x-format-assertion"] = json!(a);
            }
            compile(s).unwrap_or_else(|e| panic!("{e:?}"))
        };
        let bad = json!({"email": "not an address"});
        assert!(schema(None).validate(&bad).is_ok());
        assert!(schema(Some(false)).validate(&bad).is_ok());
        let errors = schema(Some(true)).validate(&bad).err().unwrap_or_default();
        assert_eq!(errors[0].path, "/email");
        let refused = compile(json!({"type": "object", "x-format-assertion": "yes"}));
        assert_eq!(
            refused.err().unwrap_or_default()[0].path,
            "/schema/x-format-assertion"
        );
    }

    #[test]
    fn nested_fields_resolve_by_dotted_path() {
        let s = compile(json!({"type": "object", "properties": {
            "customer": {"type": "object", "properties": {"name": {"type": "string", "x-index": true}}},
            "secret": {"type": "string", "x-encrypted": true}
        }}))
        .unwrap_or_else(|e| panic!("{e:?}"));
        let name = s.field("customer.name").cloned();
        assert_eq!(
            name.map(|f| (f.kind, f.indexed)),
            Some((FieldType::Text, true))
        );
        assert!(s.field("secret").is_some_and(|f| f.encrypted));
        assert!(s.field("nope").is_none());
    }

    #[test]
    fn encrypted_fields_are_found_at_any_depth_and_never_indexed() {
        let s = compile(json!({"type": "object", "properties": {
            "ssn": {"type": "string", "x-encrypted": true},
            "card": {"type": "object", "properties": {
                "pan": {"type": "object", "x-encrypted": true, "properties": {"last4": {"type": "string"}}},
                "brand": {"type": "string"}}}
        }}))
        .unwrap_or_else(|e| panic!("{e:?}"));
        let paths: Vec<String> = s.encrypted_paths().iter().map(|p| p.join(".")).collect();
        assert_eq!(paths, ["card.pan", "ssn"]);
        assert!(s.field("card.pan.last4").is_some_and(|f| f.encrypted));
        assert!(s.field("card.brand").is_some_and(|f| !f.encrypted));
        let errors = compile(json!({"type": "object", "properties": {
            "card": {"type": "object", "x-encrypted": true, "properties": {
                "pan": {"type": "string", "x-index": true}}}
        }}))
        .err()
        .unwrap_or_default();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            errors[0].path,
            "/schema/properties/card/properties/pan/x-index"
        );
    }

    #[test]
    fn non_schemas_are_refused_with_a_path() {
        let errors = compile(json!({"type": "object", "properties": {"a": {"type": 12}}}))
            .err()
            .unwrap_or_default();
        assert!(errors[0].path.starts_with("/schema"), "{errors:?}");
        assert!(compile(json!({"type": "string"})).is_err());
        assert!(compile(json!({"type": "object", "x-event-payload": "all"})).is_err());
    }

    #[test]
    fn backtracking_patterns_are_refused_by_path() {
        let errors = compile(json!({"type": "object", "properties": {
            "tags": {"type": "array", "items": {"type": "string", "pattern": "^(\\w+\\s?)*\\1$"}}
        }}))
        .err()
        .unwrap_or_default();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "/schema/properties/tags/items/pattern");
        assert!(errors[0].message.contains("linear-time"), "{errors:?}");
        let errors = compile(json!({"type": "object", "patternProperties": {"^(?=a)": {}}}))
            .err()
            .unwrap_or_default();
        assert_eq!(errors[0].path, "/schema/patternProperties/^(?=a)");
        let fine = compile(json!({"type": "object",
            "properties": {"pattern": {"type": "string", "pattern": "^[A-Z]{3}-\\d+$"}},
            "enum": [{"pattern": "(a)\\1"}]}));
        assert!(fine.is_ok(), "{:?}", fine.err());
    }
}
