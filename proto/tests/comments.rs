//! Every service, RPC, message, field, oneof, enum and enum value of `tailbox.agent.v1` carries a
//! comment: the proto files are the contract's documentation (the report's JSON is their
//! mapping), so an uncommented addition is a defect.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::collections::BTreeSet;

use prost::Message as _;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};

use tailbox_proto::schema::descriptor_path::{
    ENUM_VALUE, FILE_ENUM, FILE_MESSAGE, FILE_SERVICE, MESSAGE_ENUM, MESSAGE_FIELD, MESSAGE_NESTED,
    MESSAGE_ONEOF, SERVICE_METHOD,
};

#[test]
fn every_element_of_the_agent_contract_is_commented() {
    let set = FileDescriptorSet::decode(tailbox_proto::AGENT_V1_DESCRIPTOR_SET).unwrap();
    let mut checked = 0;
    let mut missing = Vec::new();
    for file in set
        .file
        .iter()
        .filter(|f| f.package() == "tailbox.agent.v1")
    {
        let commented: BTreeSet<Vec<i32>> = file
            .source_code_info
            .as_ref()
            .expect("protox keeps source info")
            .location
            .iter()
            .filter(|l| l.leading_comments().trim().len() > 1)
            .map(|l| l.path.clone())
            .collect();
        let mut elements = Vec::new();
        for (i, message) in file.message_type.iter().enumerate() {
            message_elements(message, vec![FILE_MESSAGE, i as i32], &mut elements);
        }
        for (i, e) in file.enum_type.iter().enumerate() {
            enum_elements(e, vec![FILE_ENUM, i as i32], &mut elements);
        }
        for (i, service) in file.service.iter().enumerate() {
            let path = vec![FILE_SERVICE, i as i32];
            elements.push((path.clone(), service.name().to_owned()));
            for (j, method) in service.method.iter().enumerate() {
                let mut path = path.clone();
                path.extend([SERVICE_METHOD, j as i32]);
                elements.push((path, format!("{}.{}", service.name(), method.name())));
            }
        }
        for (path, name) in elements {
            checked += 1;
            if !commented.contains(&path) {
                missing.push(format!("{}: {name}", file.name()));
            }
        }
    }
    assert!(checked > 300, "only {checked} elements were found");
    assert!(missing.is_empty(), "uncommented: {missing:#?}");
}

fn message_elements(message: &DescriptorProto, path: Vec<i32>, out: &mut Vec<(Vec<i32>, String)>) {
    out.push((path.clone(), message.name().to_owned()));
    for (j, field) in message.field.iter().enumerate() {
        let mut field_path = path.clone();
        field_path.extend([MESSAGE_FIELD, j as i32]);
        out.push((field_path, format!("{}.{}", message.name(), field.name())));
    }
    for (j, oneof) in message.oneof_decl.iter().enumerate() {
        let mut oneof_path = path.clone();
        oneof_path.extend([MESSAGE_ONEOF, j as i32]);
        out.push((oneof_path, format!("{}.{}", message.name(), oneof.name())));
    }
    for (j, nested) in message.nested_type.iter().enumerate() {
        // `map<K, V>` fields get a synthesized entry message with no source of its own.
        if nested.options.as_ref().is_some_and(|o| o.map_entry()) {
            continue;
        }
        let mut nested_path = path.clone();
        nested_path.extend([MESSAGE_NESTED, j as i32]);
        message_elements(nested, nested_path, out);
    }
    for (j, e) in message.enum_type.iter().enumerate() {
        let mut enum_path = path.clone();
        enum_path.extend([MESSAGE_ENUM, j as i32]);
        enum_elements(e, enum_path, out);
    }
}

fn enum_elements(e: &EnumDescriptorProto, path: Vec<i32>, out: &mut Vec<(Vec<i32>, String)>) {
    out.push((path.clone(), e.name().to_owned()));
    for (j, value) in e.value.iter().enumerate() {
        let mut value_path = path.clone();
        value_path.extend([ENUM_VALUE, j as i32]);
        out.push((value_path, value.name().to_owned()));
    }
}
