//! Our Modal proto subset against the descriptors Modal publishes in the pinned `modal` wheel.
//!
//! Needs `python3 proto/scripts/modal-descriptors.py` to have run once (it caches the
//! descriptors); without them these tests fail with that instruction rather than skip.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use prost_types::FileDescriptorSet;
use tailbox_testkit::modal_descriptors::{compare, ours, pinned};

#[test]
fn our_subset_matches_the_pinned_modal_package() {
    let theirs = pinned().unwrap_or_else(|e| panic!("{e:#}"));
    let result = compare(&ours(), &theirs);
    assert!(
        result.differences.is_empty(),
        "our modal_proto subset differs from modal==1.6.4:\n{}",
        result.differences.join("\n")
    );
    // Every field, enum value and RPC we declare was looked at.
    assert!(
        result.checked > 100,
        "only {} items checked",
        result.checked
    );
}

/// Changes the number of `modal.task_command_router.TaskExecStdioReadRequest.offset`.
fn with_offset_renumbered(mut set: FileDescriptorSet) -> FileDescriptorSet {
    let field = set
        .file
        .iter_mut()
        .filter(|f| f.package() == "modal.task_command_router")
        .flat_map(|f| f.message_type.iter_mut())
        .filter(|m| m.name() == "TaskExecStdioReadRequest")
        .flat_map(|m| m.field.iter_mut())
        .find(|f| f.name() == "offset")
        .unwrap();
    field.number = Some(33);
    set
}

#[test]
fn a_changed_field_number_fails_the_check_against_modal() {
    let theirs = pinned().unwrap_or_else(|e| panic!("{e:#}"));
    let result = compare(&with_offset_renumbered(ours()), &theirs);
    assert_eq!(result.differences.len(), 1, "{:#?}", result.differences);
    assert!(
        result.differences[0].contains("TaskExecStdioReadRequest.offset"),
        "{}",
        result.differences[0]
    );
}

#[test]
fn the_check_catches_each_kind_of_difference_without_network() {
    // Against our own descriptors (no download needed): identical passes, every kind of change fails.
    assert!(compare(&ours(), &ours()).differences.is_empty());
    assert_eq!(
        compare(&with_offset_renumbered(ours()), &ours())
            .differences
            .len(),
        1
    );

    let mut changed = ours();
    let api = changed
        .file
        .iter_mut()
        .find(|f| f.package() == "modal.client")
        .unwrap();
    let create = api
        .message_type
        .iter_mut()
        .find(|m| m.name() == "SandboxCreateRequest")
        .unwrap();
    // A type change (string → bytes) of app_id.
    create.field[0].r#type = Some(prost_types::field_descriptor_proto::Type::Bytes as i32);
    let service = api.service.first_mut().unwrap();
    // A streaming change of an RPC.
    service.method[0].server_streaming = Some(true);
    let status = api
        .enum_type
        .iter_mut()
        .find(|e| e.name() == "ObjectCreationType")
        .unwrap();
    status.value[1].number = Some(7);
    let diffs = compare(&changed, &ours()).differences;
    assert_eq!(diffs.len(), 3, "{diffs:#?}");
}
