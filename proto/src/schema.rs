//! JSON Schema (draft 2020-12) of what `tailbox check --json` and `--report` write, generated from
//! the descriptors of `tailbox.agent.v1` so the schema cannot drift from the proto.
//!
//! The JSON is pbjson's proto3 mapping as `build.rs` configures it, and the schema states exactly
//! that: field names as in the proto (`preserve_proto_field_names`); every scalar, repeated and map
//! field always present, defaults included (`emit_fields`); message fields and proto3 `optional`
//! fields only when set; at most one member of each `oneof`; 64-bit integers as decimal strings;
//! enums as their value names; `Duration` as seconds with 0, 3, 6 or 9 fractional digits and a
//! final `s`; `Timestamp` as RFC 3339; bytes as base64. Comments in the proto become
//! `description`s.
//!
//! `cargo xtask schema` writes [`generate`]'s files to `docs/schema/`; `proto/tests/schema.rs`
//! fails when the committed files are stale.

use std::collections::BTreeMap;

use prost::Message as _;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorProto,
    FileDescriptorSet,
};
use serde_json::{Map, Value, json};

/// The messages that are documents of their own: what `--json` and `--report` write.
pub const ROOTS: &[Root] = &[
    Root {
        file: "report.schema.json",
        message: "tailbox.agent.v1.Report",
        what: "The report of one sandbox's run: the last `--json` line's `report`, and what `--report FILE` writes.",
    },
    Root {
        file: "event.schema.json",
        message: "tailbox.agent.v1.Event",
        what: "One line of `tailbox check --json`: an event of the run; the last one carries the report.",
    },
    Root {
        file: "fleet-report.schema.json",
        message: "tailbox.agent.v1.FleetReport",
        what: "The aggregated report of a run over several sandboxes (`--count N`, or several `--sandbox-id`): the last `--json` line's `fleet_report`, and what `--report FILE` writes.",
    },
    Root {
        file: "fleet-event.schema.json",
        message: "tailbox.agent.v1.FleetEvent",
        what: "One line of `tailbox check --json` in a run over several sandboxes: a sandbox's event or outcome, or (last) the aggregated report.",
    },
];

/// One schema document.
#[derive(Debug, Clone, Copy)]
pub struct Root {
    /// File name under `docs/schema/`.
    pub file: &'static str,
    /// Full name of the proto message it describes.
    pub message: &'static str,
    /// What the document is, for its `description`.
    pub what: &'static str,
}

/// Whether an object accepts keys the schema does not name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Openness {
    /// Unknown keys are allowed: the published contract, since v1 only ever gains fields and an
    /// older tool must accept a newer report.
    Open,
    /// Unknown keys are refused: for tests of this build's own output, where an unnamed key
    /// means the schema and the serializer disagree.
    Closed,
}

/// The schema could not be generated.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The embedded descriptor set does not decode.
    #[error("Failed to decode the descriptor set")]
    Decode(#[source] prost::DecodeError),
    /// A type the contract refers to is not in the descriptor set.
    #[error("The type {0} is not in the descriptor set")]
    UnknownType(String),
    /// A field has a type this generator does not map.
    #[error("The field {0} has a type the schema generator does not handle")]
    UnsupportedType(String),
    /// A document could not be written as JSON text.
    #[error("Failed to encode a schema as JSON")]
    Encode(#[source] serde_json::Error),
}

/// Every root's schema, as `(file name, document)`.
pub fn generate(openness: Openness) -> Result<Vec<(&'static str, Value)>, SchemaError> {
    let set =
        FileDescriptorSet::decode(crate::AGENT_V1_DESCRIPTOR_SET).map_err(SchemaError::Decode)?;
    let index = Index::new(&set);
    ROOTS
        .iter()
        .map(|root| Ok((root.file, index.document(root, openness)?)))
        .collect()
}

/// Every root's schema as the text committed under `docs/schema/`.
pub fn generate_files() -> Result<Vec<(&'static str, String)>, SchemaError> {
    generate(Openness::Open)?
        .into_iter()
        .map(|(file, doc)| {
            let mut text = serde_json::to_string_pretty(&doc).map_err(SchemaError::Encode)?;
            text.push('\n');
            Ok((file, text))
        })
        .collect()
}

use descriptor_path::{
    ENUM_VALUE, FILE_ENUM, FILE_MESSAGE, MESSAGE_ENUM, MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ONEOF,
};

/// Field numbers in descriptor.proto, which source locations use as paths (also read by
/// `proto/tests/comments.rs`).
pub mod descriptor_path {
    pub const FILE_MESSAGE: i32 = 4;
    pub const FILE_ENUM: i32 = 5;
    pub const FILE_SERVICE: i32 = 6;
    pub const MESSAGE_FIELD: i32 = 2;
    pub const MESSAGE_NESTED: i32 = 3;
    pub const MESSAGE_ENUM: i32 = 4;
    pub const MESSAGE_ONEOF: i32 = 8;
    pub const ENUM_VALUE: i32 = 2;
    pub const SERVICE_METHOD: i32 = 2;
}

/// A message or an enum, with where its comments are.
enum Def<'a> {
    Message {
        message: &'a DescriptorProto,
        file: &'a FileDescriptorProto,
        path: Vec<i32>,
    },
    Enum {
        enumeration: &'a EnumDescriptorProto,
        file: &'a FileDescriptorProto,
        path: Vec<i32>,
    },
}

/// Every type of the set by full name (without the leading dot).
struct Index<'a> {
    defs: BTreeMap<String, Def<'a>>,
}

impl<'a> Index<'a> {
    fn new(set: &'a FileDescriptorSet) -> Self {
        let mut defs = BTreeMap::new();
        for file in &set.file {
            let package = file.package();
            for (i, message) in file.message_type.iter().enumerate() {
                add_message(
                    &mut defs,
                    file,
                    package,
                    message,
                    vec![FILE_MESSAGE, i as i32],
                );
            }
            for (i, enumeration) in file.enum_type.iter().enumerate() {
                defs.insert(
                    qualify(package, enumeration.name()),
                    Def::Enum {
                        enumeration,
                        file,
                        path: vec![FILE_ENUM, i as i32],
                    },
                );
            }
        }
        Self { defs }
    }

    fn document(&self, root: &Root, openness: Openness) -> Result<Value, SchemaError> {
        let mut defs = BTreeMap::new();
        let mut pending = vec![root.message.to_owned()];
        while let Some(name) = pending.pop() {
            if defs.contains_key(&name) || well_known(&name).is_some() {
                continue;
            }
            let (schema, refs) = self.def_schema(&name, openness)?;
            pending.extend(refs);
            defs.insert(name, schema);
        }
        let mut doc = Map::new();
        doc.insert(
            "$schema".into(),
            json!("https://json-schema.org/draft/2020-12/schema"),
        );
        doc.insert(
            "$comment".into(),
            json!(
                "Generated from proto/proto/tailbox/agent/v1/*.proto by `cargo xtask schema`; do not edit."
            ),
        );
        doc.insert("title".into(), json!(root.message));
        doc.insert(
            "description".into(),
            json!(format!(
                "{} schema_version {}: v1 only ever gains fields, so unknown keys are to be ignored.",
                root.what,
                crate::REPORT_SCHEMA_VERSION
            )),
        );
        doc.insert("$ref".into(), json!(def_ref(root.message)));
        doc.insert(
            "$defs".into(),
            Value::Object(defs.into_iter().collect::<Map<_, _>>()),
        );
        Ok(Value::Object(doc))
    }

    /// The schema of one message or enum, and the types it refers to.
    fn def_schema(
        &self,
        name: &str,
        openness: Openness,
    ) -> Result<(Value, Vec<String>), SchemaError> {
        match self.defs.get(name) {
            Some(Def::Message {
                message,
                file,
                path,
            }) => self.message_schema(name, message, file, path, openness),
            Some(Def::Enum {
                enumeration,
                file,
                path,
            }) => Ok((enum_schema(enumeration, file, path), Vec::new())),
            None => Err(SchemaError::UnknownType(name.to_owned())),
        }
    }

    fn message_schema(
        &self,
        name: &str,
        message: &DescriptorProto,
        file: &FileDescriptorProto,
        path: &[i32],
        openness: Openness,
    ) -> Result<(Value, Vec<String>), SchemaError> {
        let mut refs = Vec::new();
        let mut properties = Map::new();
        let mut required = Vec::new();
        // The members of each real oneof (proto3 `optional` is a synthetic one of its own).
        let mut oneofs: BTreeMap<i32, Vec<String>> = BTreeMap::new();
        for (i, field) in message.field.iter().enumerate() {
            let mut schema = self.field_schema(name, field, &mut refs)?;
            // Every report of v1 says 1: the one thing about it that never changes.
            if field.name() == "schema_version" {
                schema = json!({ "type": "integer", "const": crate::REPORT_SCHEMA_VERSION });
            }
            let mut field_path = path.to_vec();
            field_path.extend([MESSAGE_FIELD, i as i32]);
            describe(&mut schema, comment(file, &field_path));
            properties.insert(field.name().to_owned(), schema);

            let repeated = field.label() == Label::Repeated;
            match field.oneof_index {
                Some(oneof) if !field.proto3_optional() => {
                    oneofs
                        .entry(oneof)
                        .or_default()
                        .push(field.name().to_owned());
                }
                // Set or not: present only when set.
                Some(_) => {}
                None if field.r#type() == Type::Message && !repeated => {}
                None => required.push(json!(field.name())),
            }
        }

        let mut schema = Map::new();
        schema.insert("title".into(), json!(message.name()));
        if let Some(text) = comment(file, path) {
            schema.insert("description".into(), json!(text));
        }
        schema.insert("type".into(), json!("object"));
        schema.insert("properties".into(), Value::Object(properties));
        schema.insert("required".into(), Value::Array(required));
        if openness == Openness::Closed {
            schema.insert("additionalProperties".into(), json!(false));
        }
        let at_most_one: Vec<Value> = oneofs
            .iter()
            .map(|(index, members)| {
                let mut oneof_path = path.to_vec();
                oneof_path.extend([MESSAGE_ONEOF, *index]);
                let mut choices: Vec<Value> = members
                    .iter()
                    .map(|member| json!({ "required": [member] }))
                    .collect();
                // None set is fine too: exactly one of these branches matches.
                choices.push(json!({ "not": { "anyOf": choices.clone() } }));
                let oneof_name = message
                    .oneof_decl
                    .get(*index as usize)
                    .map(|d| d.name().to_owned())
                    .unwrap_or_default();
                let mut text = format!("oneof {oneof_name}: at most one of its members is set.");
                if let Some(about) = comment(file, &oneof_path) {
                    text = format!("{text} {about}");
                }
                json!({ "description": text, "oneOf": choices })
            })
            .collect();
        if !at_most_one.is_empty() {
            schema.insert("allOf".into(), Value::Array(at_most_one));
        }
        Ok((Value::Object(schema), refs))
    }

    /// The schema of a field's value (an array of it when repeated, an object when a map).
    fn field_schema(
        &self,
        message: &str,
        field: &FieldDescriptorProto,
        refs: &mut Vec<String>,
    ) -> Result<Value, SchemaError> {
        let what = || format!("{message}.{}", field.name());
        if field.r#type() == Type::Message {
            let type_name = field.type_name().trim_start_matches('.');
            if let Some(Def::Message { message: entry, .. }) = self.defs.get(type_name)
                && entry.options.as_ref().is_some_and(|o| o.map_entry())
            {
                // A map: an object whose keys are the keys as strings.
                let value = entry
                    .field
                    .iter()
                    .find(|f| f.number() == 2)
                    .ok_or_else(|| SchemaError::UnsupportedType(what()))?;
                let key = entry
                    .field
                    .iter()
                    .find(|f| f.number() == 1)
                    .ok_or_else(|| SchemaError::UnsupportedType(what()))?;
                let mut schema = json!({
                    "type": "object",
                    "additionalProperties": self.value_schema(value, refs, &what)?,
                });
                if let Some(pattern) = map_key_pattern(key.r#type()) {
                    schema["propertyNames"] = json!({ "pattern": pattern });
                }
                return Ok(schema);
            }
        }
        let value = self.value_schema(field, refs, &what)?;
        if field.label() == Label::Repeated {
            Ok(json!({ "type": "array", "items": value }))
        } else {
            Ok(value)
        }
    }

    /// The schema of one value of the field's type.
    fn value_schema(
        &self,
        field: &FieldDescriptorProto,
        refs: &mut Vec<String>,
        what: &dyn Fn() -> String,
    ) -> Result<Value, SchemaError> {
        Ok(match field.r#type() {
            Type::Double | Type::Float => json!({
                "oneOf": [
                    { "type": "number" },
                    { "enum": ["NaN", "Infinity", "-Infinity"] },
                ]
            }),
            Type::Int32 | Type::Sint32 | Type::Sfixed32 => json!({
                "type": "integer", "minimum": i32::MIN, "maximum": i32::MAX,
            }),
            Type::Uint32 | Type::Fixed32 => json!({
                "type": "integer", "minimum": 0, "maximum": u32::MAX,
            }),
            Type::Int64 | Type::Sint64 | Type::Sfixed64 => json!({
                "type": "string",
                "pattern": "^-?[0-9]+$",
                "$comment": "A 64-bit integer, as a decimal string.",
            }),
            Type::Uint64 | Type::Fixed64 => json!({
                "type": "string",
                "pattern": "^[0-9]+$",
                "$comment": "An unsigned 64-bit integer, as a decimal string.",
            }),
            Type::Bool => json!({ "type": "boolean" }),
            Type::String => json!({ "type": "string" }),
            Type::Bytes => json!({
                "type": "string",
                "contentEncoding": "base64",
            }),
            Type::Enum | Type::Message => {
                let type_name = field.type_name().trim_start_matches('.');
                if let Some(schema) = well_known(type_name) {
                    schema
                } else if self.defs.contains_key(type_name) {
                    refs.push(type_name.to_owned());
                    json!({ "$ref": def_ref(type_name) })
                } else {
                    return Err(SchemaError::UnknownType(type_name.to_owned()));
                }
            }
            Type::Group => return Err(SchemaError::UnsupportedType(what())),
        })
    }
}

fn add_message<'a>(
    defs: &mut BTreeMap<String, Def<'a>>,
    file: &'a FileDescriptorProto,
    scope: &str,
    message: &'a DescriptorProto,
    path: Vec<i32>,
) {
    let name = qualify(scope, message.name());
    for (i, nested) in message.nested_type.iter().enumerate() {
        let mut nested_path = path.clone();
        nested_path.extend([MESSAGE_NESTED, i as i32]);
        add_message(defs, file, &name, nested, nested_path);
    }
    for (i, enumeration) in message.enum_type.iter().enumerate() {
        let mut enum_path = path.clone();
        enum_path.extend([MESSAGE_ENUM, i as i32]);
        defs.insert(
            qualify(&name, enumeration.name()),
            Def::Enum {
                enumeration,
                file,
                path: enum_path,
            },
        );
    }
    defs.insert(
        name,
        Def::Message {
            message,
            file,
            path,
        },
    );
}

fn enum_schema(
    enumeration: &EnumDescriptorProto,
    file: &FileDescriptorProto,
    path: &[i32],
) -> Value {
    let values: Vec<Value> = enumeration
        .value
        .iter()
        .enumerate()
        .map(|(i, value)| {
            let mut value_path = path.to_vec();
            value_path.extend([ENUM_VALUE, i as i32]);
            let mut schema = json!({ "const": value.name() });
            describe(&mut schema, comment(file, &value_path));
            schema
        })
        .collect();
    let mut schema = json!({
        "title": enumeration.name(),
        "type": "string",
        "oneOf": values,
    });
    describe(&mut schema, comment(file, path));
    schema
}

/// How pbjson writes the well-known types the contract uses.
fn well_known(name: &str) -> Option<Value> {
    match name {
        "google.protobuf.Duration" => Some(json!({
            "type": "string",
            "pattern": "^-?[0-9]+(\\.[0-9]{3}|\\.[0-9]{6}|\\.[0-9]{9})?s$",
            "$comment": "A google.protobuf.Duration: seconds with 0, 3, 6 or 9 fractional digits and a final s, e.g. \"0.250s\".",
        })),
        "google.protobuf.Timestamp" => Some(json!({
            "type": "string",
            "format": "date-time",
            "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$",
            "$comment": "A google.protobuf.Timestamp in RFC 3339, e.g. \"2026-12-02T10:30:24.123456789+00:00\".",
        })),
        _ => None,
    }
}

/// Map keys are strings in JSON; integer keys are their decimal form.
fn map_key_pattern(key: Type) -> Option<&'static str> {
    match key {
        Type::String => None,
        Type::Bool => Some("^(true|false)$"),
        Type::Uint32 | Type::Uint64 | Type::Fixed32 | Type::Fixed64 => Some("^[0-9]+$"),
        _ => Some("^-?[0-9]+$"),
    }
}

fn def_ref(name: &str) -> String {
    format!("#/$defs/{name}")
}

fn qualify(scope: &str, name: &str) -> String {
    if scope.is_empty() {
        name.to_owned()
    } else {
        format!("{scope}.{name}")
    }
}

/// Adds `text` as the schema's `description`.
fn describe(schema: &mut Value, text: Option<String>) {
    if let (Some(object), Some(text)) = (schema.as_object_mut(), text) {
        object.insert("description".into(), json!(text));
    }
}

/// The leading comment of the element at `path`, its lines joined into sentences and its blank
/// lines kept as paragraph breaks.
fn comment(file: &FileDescriptorProto, path: &[i32]) -> Option<String> {
    let location = file
        .source_code_info
        .as_ref()?
        .location
        .iter()
        .find(|l| l.path == path)?;
    let raw = location.leading_comments();
    let paragraphs: Vec<String> = raw
        .split("\n\n")
        .map(|paragraph| {
            paragraph
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|p| !p.is_empty())
        .collect();
    (!paragraphs.is_empty()).then(|| paragraphs.join("\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_root_refers_only_to_types_it_defines() {
        for (file, doc) in generate(Openness::Open).unwrap() {
            let defs = doc["$defs"].as_object().unwrap();
            let text = doc.to_string();
            for reference in text.split("\"#/$defs/").skip(1) {
                let name = reference.split('"').next().unwrap();
                assert!(defs.contains_key(name), "{file}: {name} is not defined");
            }
        }
    }
}
