//! Checks our Modal proto subset against Modal's published descriptors.
//!
//! Everything we declare must match Modal: each message exists, and each of our fields has the
//! same number, type, label, type name, proto3-optional flag and oneof; each of our enum values
//! has the same number; each of our RPCs has the same input, output and streaming. Whatever
//! Modal has and we omit is fine.
//!
//! Modal's descriptors come from the pinned `modal` wheel on PyPI, fetched (outside of tests)
//! by `python3 proto/scripts/modal-descriptors.py` into the tailbox cache dir.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use prost::Message;
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorSet,
    ServiceDescriptorProto,
};

/// The `modal` package version our subset is checked against.
pub const PINNED_MODAL_VERSION: &str = "1.6.4";

/// Overrides where the pinned descriptors are read from.
pub const DESCRIPTORS_ENV: &str = "TAILBOX_MODAL_DESCRIPTORS";

/// The command that fetches the pinned descriptors.
pub const FETCH_COMMAND: &str = "python3 proto/scripts/modal-descriptors.py";

/// What a comparison found.
#[derive(Debug, Default)]
pub struct Comparison {
    /// Fields, enum values and RPCs compared.
    pub checked: usize,
    /// Each difference, one line each.
    pub differences: Vec<String>,
}

/// Our subset, as compiled into `tailbox-proto`.
pub fn ours() -> FileDescriptorSet {
    FileDescriptorSet::decode(tailbox_proto::MODAL_DESCRIPTOR_SET)
        .expect("tailbox-proto embeds a valid descriptor set")
}

/// `${TAILBOX_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tailbox}`, as the script computes it.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TAILBOX_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
        });
    base.join("tailbox")
}

/// Where the script leaves the pinned descriptors.
pub fn pinned_path() -> PathBuf {
    std::env::var_os(DESCRIPTORS_ENV)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            cache_dir()
                .join(format!("modal-{PINNED_MODAL_VERSION}"))
                .join("descriptors.binpb")
        })
}

/// Modal's descriptors for the pinned version. Fails (never skips) when they were not fetched.
pub fn pinned() -> Result<FileDescriptorSet> {
    let path = pinned_path();
    if !path.is_file() {
        bail!(
            "Modal's descriptors for modal=={PINNED_MODAL_VERSION} are not at {}; run `{FETCH_COMMAND}` once (it uses pip and PyPI), or set {DESCRIPTORS_ENV}",
            path.display()
        );
    }
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    FileDescriptorSet::decode(bytes.as_slice())
        .with_context(|| format!("decoding {} as a FileDescriptorSet", path.display()))
}

/// Compares `ours` with `theirs`; see the module docs for what must match.
pub fn compare(ours: &FileDescriptorSet, theirs: &FileDescriptorSet) -> Comparison {
    let index = Index::new(theirs);
    let mut out = Comparison::default();
    // Imports (google.protobuf.*) are not ours to check.
    for file in ours
        .file
        .iter()
        .filter(|f| f.package().starts_with("modal."))
    {
        let package = format!(".{}", file.package());
        for message in &file.message_type {
            compare_message(&package, message, &index, &mut out);
        }
        for en in &file.enum_type {
            compare_enum(&package, en, &index, &mut out);
        }
        for service in &file.service {
            compare_service(&package, service, &index, &mut out);
        }
    }
    out
}

struct Index<'a> {
    messages: HashMap<String, &'a DescriptorProto>,
    enums: HashMap<String, &'a EnumDescriptorProto>,
    services: HashMap<String, &'a ServiceDescriptorProto>,
}

impl<'a> Index<'a> {
    fn new(set: &'a FileDescriptorSet) -> Self {
        let mut index = Self {
            messages: HashMap::new(),
            enums: HashMap::new(),
            services: HashMap::new(),
        };
        for file in &set.file {
            let package = format!(".{}", file.package());
            for message in &file.message_type {
                index.add_message(&package, message);
            }
            for en in &file.enum_type {
                index.enums.insert(format!("{package}.{}", en.name()), en);
            }
            for service in &file.service {
                index
                    .services
                    .insert(format!("{package}.{}", service.name()), service);
            }
        }
        index
    }

    fn add_message(&mut self, scope: &str, message: &'a DescriptorProto) {
        let name = format!("{scope}.{}", message.name());
        for nested in &message.nested_type {
            self.add_message(&name, nested);
        }
        for en in &message.enum_type {
            self.enums.insert(format!("{name}.{}", en.name()), en);
        }
        self.messages.insert(name, message);
    }
}

fn compare_message(scope: &str, ours: &DescriptorProto, index: &Index, out: &mut Comparison) {
    let name = format!("{scope}.{}", ours.name());
    let Some(theirs) = index.messages.get(&name) else {
        out.differences
            .push(format!("message {name}: not in Modal's descriptors"));
        return;
    };
    for field in &ours.field {
        out.checked += 1;
        let Some(their_field) = theirs.field.iter().find(|f| f.name() == field.name()) else {
            out.differences.push(format!(
                "{name}.{}: no such field in Modal's message",
                field.name()
            ));
            continue;
        };
        let ours_shape = FieldShape::of(field, ours);
        let theirs_shape = FieldShape::of(their_field, theirs);
        if ours_shape != theirs_shape {
            out.differences.push(format!(
                "{name}.{}: ours is {ours_shape:?}, Modal's is {theirs_shape:?}",
                field.name()
            ));
        }
    }
    for nested in &ours.nested_type {
        compare_message(&name, nested, index, out);
    }
    for en in &ours.enum_type {
        compare_enum(&name, en, index, out);
    }
}

/// Everything about a field that affects the wire or the generated code's meaning.
#[derive(Debug, PartialEq, Eq)]
struct FieldShape {
    number: i32,
    label: i32,
    r#type: i32,
    type_name: String,
    proto3_optional: bool,
    oneof: Option<String>,
}

impl FieldShape {
    fn of(field: &FieldDescriptorProto, message: &DescriptorProto) -> Self {
        Self {
            number: field.number(),
            label: field.label.unwrap_or_default(),
            r#type: field.r#type.unwrap_or_default(),
            type_name: field.type_name().to_owned(),
            proto3_optional: field.proto3_optional(),
            // By name: indices shift when a message has oneofs we leave out.
            oneof: field.oneof_index.and_then(|i| {
                usize::try_from(i)
                    .ok()
                    .and_then(|i| message.oneof_decl.get(i))
                    .map(|o| o.name().to_owned())
            }),
        }
    }
}

fn compare_enum(scope: &str, ours: &EnumDescriptorProto, index: &Index, out: &mut Comparison) {
    let name = format!("{scope}.{}", ours.name());
    let Some(theirs) = index.enums.get(&name) else {
        out.differences
            .push(format!("enum {name}: not in Modal's descriptors"));
        return;
    };
    for value in &ours.value {
        out.checked += 1;
        match theirs.value.iter().find(|v| v.name() == value.name()) {
            None => out
                .differences
                .push(format!("{name}.{}: no such enum value", value.name())),
            Some(their_value) if their_value.number() != value.number() => {
                out.differences.push(format!(
                    "{name}.{}: ours is {}, Modal's is {}",
                    value.name(),
                    value.number(),
                    their_value.number()
                ))
            }
            Some(_) => {}
        }
    }
}

fn compare_service(
    scope: &str,
    ours: &ServiceDescriptorProto,
    index: &Index,
    out: &mut Comparison,
) {
    let name = format!("{scope}.{}", ours.name());
    let Some(theirs) = index.services.get(&name) else {
        out.differences
            .push(format!("service {name}: not in Modal's descriptors"));
        return;
    };
    for method in &ours.method {
        out.checked += 1;
        let Some(their_method) = theirs.method.iter().find(|m| m.name() == method.name()) else {
            out.differences.push(format!(
                "rpc {name}.{}: not in Modal's service",
                method.name()
            ));
            continue;
        };
        let shape = |m: &prost_types::MethodDescriptorProto| {
            (
                m.input_type().to_owned(),
                m.output_type().to_owned(),
                m.client_streaming(),
                m.server_streaming(),
            )
        };
        if shape(method) != shape(their_method) {
            out.differences.push(format!(
                "rpc {name}.{}: ours is {:?}, Modal's is {:?}",
                method.name(),
                shape(method),
                shape(their_method)
            ));
        }
    }
}
