//! The official JSON Schema Test Suite (draft 2020-12, vendored under
//! `tests/conformance`: the required tests, the optional ones, and the
//! format ones with format assertion asked for), run through the API: each group's schema becomes a
//! resource schema, each test's instance a record, and the record must be
//! accepted (201) or refused (422) as the suite says. Records are JSON
//! objects, so the suite's schema is embedded as its own schema resource
//! (`$id`) under the property `v` and the instance sent as `{"v": ...}`:
//! `$ref`s, anchors and dynamic scopes inside it resolve as at a root.
//! Remote `$ref`s (`http://localhost:1234/...`) are read from the suite's
//! `remotes/` (`BSS_SCHEMA_REMOTES`). What the product does not support is
//! listed, with the reason, in `tests/conformance/json-schema-unsupported.txt`;
//! any other difference fails the test, and so does a listed case that
//! passes (the list stays true).

use std::collections::BTreeMap;
use std::path::Path;

use bss_tests::*;
use serde_json::{Value, json};

const SUITE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/conformance/json-schema-test-suite"
);
const UNSUPPORTED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/conformance/json-schema-unsupported.txt"
);

/// The suite's schema as a resource schema (see the module's comment).
fn wrap(schema: &Value, n: usize) -> Value {
    let base = format!("https://suite.business-store.test/{n}/");
    match schema {
        Value::Object(inner) => {
            let mut inner = inner.clone();
            let reference = match inner.get("$id").and_then(Value::as_str) {
                Some(id) => id.to_owned(),
                None => {
                    inner.insert("$id".into(), json!(format!("{base}schema.json")));
                    format!("{base}schema.json")
                }
            };
            json!({
                "$id": format!("{base}wrapper.json"),
                "type": "object",
                "required": ["v"],
                "properties": {"v": {"$ref": reference}},
                "$defs": {"suite": inner}
            })
        }
        other => json!({
            "type": "object",
            "required": ["v"],
            "properties": {"v": other}
        }),
    }
}

/// How one test of the suite went.
#[derive(Debug, PartialEq)]
enum Outcome {
    Passed,
    /// The record was accepted when it should have been refused, or the
    /// other way round.
    Wrong(String),
    /// The schema itself was refused.
    SchemaRefused(String),
    /// The record was refused for something else than the schema (U+0000).
    Refused(String),
}

/// `file | group | test` → why it is not supported.
fn unsupported() -> BTreeMap<String, String> {
    std::fs::read_to_string(UNSUPPORTED)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (case, reason) = l.rsplit_once(" | ").unwrap();
            (case.trim().to_owned(), reason.trim().to_owned())
        })
        .collect()
}

/// Whether `case` is listed: exactly, or by its group (`file | group | *`)
/// or its file (`file | * | *`).
fn listed<'a>(list: &'a BTreeMap<String, String>, case: &str) -> Option<&'a String> {
    let mut parts = case.splitn(3, " | ");
    let (file, group) = (parts.next().unwrap(), parts.next().unwrap());
    list.get(case)
        .or_else(|| list.get(&format!("{file} | {group} | *")))
        .or_else(|| list.get(&format!("{file} | * | *")))
}

#[tokio::test]
async fn the_json_schema_test_suite_passes_through_the_api() {
    let remotes = format!("http://localhost:1234/={SUITE}/remotes");
    let app = TestApp::spawn_with(move |s| {
        s.schema_remotes = Some(remotes);
        s.rate_limit_rps = 0;
    })
    .await;
    let (_, token) = app.tenant().await;
    let dir = Path::new(SUITE).join("tests/draft2020-12");
    let json_files = |dir: &Path| -> Vec<std::path::PathBuf> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        files
    };
    // The required tests, the optional ones, and the format ones (run
    // with format assertion asked for: `x-format-assertion`).
    let mut files = json_files(&dir);
    files.extend(json_files(&dir.join("optional")));
    files.extend(json_files(&dir.join("optional/format")));

    let mut outcomes: Vec<(String, Outcome)> = Vec::new();
    let mut n = 0;
    for file in &files {
        let name = file
            .strip_prefix(&dir)
            .unwrap()
            .with_extension("")
            .to_string_lossy()
            .into_owned();
        let assert_formats = name.starts_with("optional/format/");
        let groups: Vec<Value> =
            serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        for group in groups {
            n += 1;
            let resource = format!("s{n}");
            let description = group["description"].as_str().unwrap();
            let mut schema = wrap(&group["schema"], n);
            if assert_formats {
                schema["x-format-assertion"] = json!(true);
            }
            let put = app.put_schema(&resource, &token, schema).await;
            let schema_refused = if put.status() == 201 {
                None
            } else {
                Some(format!("{} {}", put.status(), body(put).await))
            };
            for test in group["tests"].as_array().unwrap() {
                let case = format!(
                    "{name} | {description} | {}",
                    test["description"].as_str().unwrap()
                );
                if let Some(why) = &schema_refused {
                    outcomes.push((case, Outcome::SchemaRefused(why.clone())));
                    continue;
                }
                let valid = test["valid"].as_bool().unwrap();
                let resp = app
                    .post(
                        &format!("/v1/data/{resource}"),
                        &token,
                        &json!({"v": test["data"]}),
                    )
                    .await;
                let status = resp.status().as_u16();
                let answer = body(resp).await;
                let from_schema = answer["errors"]
                    .as_array()
                    .is_some_and(|e| e.iter().all(|e| e["source"] == "schema"));
                let outcome = match (valid, status) {
                    (true, 201) => Outcome::Passed,
                    (false, 422) if from_schema => Outcome::Passed,
                    (false, 422) | (true, 422) if !from_schema => {
                        Outcome::Refused(answer["detail"].to_string())
                    }
                    (true, _) => Outcome::Wrong(format!("valid, yet {status}: {answer}")),
                    (false, _) => Outcome::Wrong(format!("invalid, yet {status}")),
                };
                outcomes.push((case, outcome));
            }
        }
    }

    let list = unsupported();
    let mut surprises = Vec::new();
    let (mut passed, mut known) = (0, 0);
    for (case, outcome) in &outcomes {
        match (outcome, listed(&list, case)) {
            (Outcome::Passed, None) => passed += 1,
            (Outcome::Passed, Some(_)) if list.contains_key(case) => {
                surprises.push(format!("listed as unsupported, yet passes: {case}"));
            }
            // A group or file listed as a whole may hold tests that pass.
            (Outcome::Passed, Some(_)) => passed += 1,
            (_, Some(_)) => known += 1,
            (other, None) => surprises.push(format!("{case}: {other:?}")),
        }
    }
    let total = outcomes.len();
    eprintln!(
        "JSON Schema Test Suite (draft 2020-12): {passed} of {total} pass ({:.1}%); \
         {known} unsupported (listed); {} unexpected",
        100.0 * passed as f64 / total as f64,
        surprises.len()
    );
    assert!(
        surprises.is_empty(),
        "{} unexpected results:\n{}",
        surprises.len(),
        surprises.join("\n")
    );
}
