//! The WIT package is the contract with plugin authors: it must parse and
//! offer the three worlds of the plugins contract.

#[test]
fn the_wit_package_parses_and_has_the_three_worlds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk/wit");
    let mut resolve = wit_parser::Resolve::default();
    let (package, _) = resolve.push_dir(&dir).unwrap();
    let pkg = &resolve.packages[package];
    assert_eq!(pkg.name.to_string(), "bss:plugin@0.1.0");
    for world in ["validation-hook", "event-enricher", "webhook-transformer"] {
        let id = pkg
            .worlds
            .get(world)
            .unwrap_or_else(|| panic!("world {world}"));
        let w = &resolve.worlds[*id];
        assert_eq!(w.exports.len(), 1, "{world} exports one function");
        assert!(
            w.imports
                .keys()
                .any(|k| resolve.name_world_key(k).contains("host")),
            "{world} imports the host interface"
        );
    }
}

/// The example plugin, built by `scripts/test` for wasm32-wasip2, is a
/// component of the validation-hook world (no componentize step needed).
#[test]
fn the_example_plugin_builds_to_a_validation_hook_component() {
    let dir = std::env::var("BSS_TEST_PLUGINS").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../plugins/target/wasm32-wasip2/release"
        )
        .to_owned()
    });
    let path = std::path::Path::new(&dir).join("no_negative_totals.wasm");
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/test builds it)", path.display()));
    let decoded = wit_component::decode(&bytes).unwrap();
    let wit_component::DecodedWasm::Component(resolve, world) = decoded else {
        panic!("not a component");
    };
    let exports: Vec<String> = resolve.worlds[world]
        .exports
        .keys()
        .map(|k| resolve.name_world_key(k))
        .collect();
    assert_eq!(exports, vec!["validate".to_owned()]);
    let imports: Vec<String> = resolve.worlds[world]
        .imports
        .keys()
        .map(|k| resolve.name_world_key(k))
        .collect();
    assert!(
        imports.iter().any(|i| i == "bss:plugin/host@0.1.0"),
        "{imports:?}"
    );
    assert!(
        bytes.len() < 1024 * 1024,
        "well under the 5 MiB upload limit"
    );
}
