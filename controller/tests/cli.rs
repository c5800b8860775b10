//! The command line as people see it, pinned: `--help` of every command and the usage errors
//! with their hints (cases in `tests/cmd/`; regenerate with `TRYCMD=overwrite cargo test -p
//! tailbox --test cli` and review the diff).

#[test]
fn cli() {
    trycmd::TestCases::new()
        .register_bin(
            "tailbox",
            trycmd::schema::Bin::Path(env!("CARGO_BIN_EXE_tailbox").into()),
        )
        .case("tests/cmd/*.toml");
}
