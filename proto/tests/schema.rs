//! The JSON Schemas committed under `docs/schema/` are what the proto generates today: a change to
//! the contract without `cargo xtask schema` fails here.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::collections::BTreeSet;
use std::path::Path;

#[test]
fn committed_schemas_match_the_proto() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/schema");
    let generated = tailbox_proto::schema::generate_files().unwrap();
    let mut stale = Vec::new();
    for (file, text) in &generated {
        let committed = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        if committed != *text {
            stale.push(*file);
        }
    }
    assert!(
        stale.is_empty(),
        "docs/schema/{{{}}} differ from what the proto generates: run `cargo xtask schema` and commit the result",
        stale.join(",")
    );

    // Nothing else claims to be a schema there: a root dropped from the generator goes too.
    let expected: BTreeSet<String> = generated.iter().map(|(f, _)| (*f).to_owned()).collect();
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".json"))
        .collect();
    assert_eq!(present, expected, "docs/schema/ holds other .json files");
}

#[test]
fn every_field_and_enum_value_is_described() {
    // The proto's comments reach the schema: tools reading it see what each field means.
    for (file, doc) in
        tailbox_proto::schema::generate(tailbox_proto::schema::Openness::Open).unwrap()
    {
        let defs = doc["$defs"].as_object().unwrap();
        assert!(defs.len() > 5, "{file}: only {} definitions", defs.len());
        for (name, def) in defs {
            assert!(
                def["description"].is_string(),
                "{file}: {name} has no description"
            );
            if let Some(properties) = def["properties"].as_object() {
                for (field, schema) in properties {
                    assert!(
                        schema["description"].is_string(),
                        "{file}: {name}.{field} has no description"
                    );
                }
            }
            if let Some(values) = def["oneOf"].as_array() {
                for value in values {
                    assert!(
                        value["description"].is_string(),
                        "{file}: {name} value {value} has no description"
                    );
                }
            }
        }
    }
}
