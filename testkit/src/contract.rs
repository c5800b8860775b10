//! Validating tailbox's JSON output against the committed JSON Schemas (`docs/schema/`, generated
//! from the proto by `cargo xtask schema`), with a real JSON Schema validator.
//!
//! Two checks per document: against the committed schema (what tools get, which lets unknown keys
//! through, as v1 only gains fields), and against the same schema closed to unknown keys, so a key
//! the schema does not name fails here instead of slipping through.

use std::path::Path;

use serde_json::Value;
use tailbox_proto::schema::{self, Openness};

/// A document kind: its schema's file under `docs/schema/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Document {
    /// One `--json` line.
    Event,
    /// A report (`--report FILE`, and the last line's `report`).
    Report,
    /// One `--json` line of a run over several sandboxes.
    FleetEvent,
    /// The aggregated report of a run over several sandboxes.
    FleetReport,
}

impl Document {
    fn file(self) -> &'static str {
        match self {
            Document::Event => "event.schema.json",
            Document::Report => "report.schema.json",
            Document::FleetEvent => "fleet-event.schema.json",
            Document::FleetReport => "fleet-report.schema.json",
        }
    }
}

/// Validators for the committed and the closed schema of each document.
pub struct Contract {
    committed: Vec<(Document, jsonschema::Validator)>,
    closed: Vec<(Document, jsonschema::Validator)>,
}

impl Contract {
    /// Loads the committed schemas from `docs/schema/` under `workspace` and generates the
    /// closed ones.
    pub fn load(workspace: &Path) -> Self {
        let kinds = [
            Document::Event,
            Document::Report,
            Document::FleetEvent,
            Document::FleetReport,
        ];
        let committed = kinds
            .iter()
            .map(|kind| {
                let path = workspace.join("docs/schema").join(kind.file());
                let text = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
                let doc: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
                (*kind, compile(&doc, kind.file()))
            })
            .collect();
        let generated = schema::generate(Openness::Closed).expect("the schema generates");
        let closed = kinds
            .iter()
            .map(|kind| {
                let doc = &generated
                    .iter()
                    .find(|(file, _)| *file == kind.file())
                    .expect("a generated schema per document")
                    .1;
                (*kind, compile(doc, kind.file()))
            })
            .collect();
        Self { committed, closed }
    }

    /// Panics with every error when `value` is not a valid `kind` under both schemas.
    pub fn assert_valid(&self, kind: Document, value: &Value) {
        for (which, validators) in [("committed", &self.committed), ("closed", &self.closed)] {
            let validator = &validators
                .iter()
                .find(|(k, _)| *k == kind)
                .expect("a validator per document")
                .1;
            let errors: Vec<String> = validator
                .iter_errors(value)
                .map(|e| format!("  at {}: {e}", e.instance_path()))
                .collect();
            assert!(
                errors.is_empty(),
                "{kind:?} does not match the {which} {}:\n{}\n{value:#}",
                kind.file(),
                errors.join("\n")
            );
        }
    }

    /// Whether `value` is valid under the committed schema (for tests that a bad value fails).
    pub fn is_valid(&self, kind: Document, value: &Value) -> bool {
        self.committed
            .iter()
            .find(|(k, _)| *k == kind)
            .is_some_and(|(_, v)| v.is_valid(value))
    }
}

fn compile(doc: &Value, file: &str) -> jsonschema::Validator {
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(doc)
        .unwrap_or_else(|e| panic!("{file} is not a valid draft 2020-12 schema: {e}"))
}
