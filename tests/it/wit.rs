//! The WIT package is the contract with plugin authors: it must parse and
//! offer the three worlds of the plugins contract.

#[test]
fn the_wit_package_parses_and_has_the_three_worlds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit");
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
