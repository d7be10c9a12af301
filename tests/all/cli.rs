use std::process::Command;

use switchyard_e2e::*;

#[test]
fn check_config_reports_file_line_and_reason() {
    let dir = TempDir::new();
    let path = dir.0.join("bad.toml");
    std::fs::write(
        &path,
        "[[listeners]]\naddr = \"127.0.0.1:8080\"\n\n[[models]]\nname = \"m\"\n[[models.endpoints]]\nurl = \"http://127.0.0.1:9000\"\nwieght = 2\n",
    )
    .unwrap();
    let out = Command::new(router_bin()).arg("check-config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:8:", path.display())), "{err}");
    assert!(err.contains("unknown field `wieght`"), "{err}");

    std::fs::write(&path, "[[listeners]]\naddr = \"127.0.0.1:8080\"\n").unwrap();
    let out = Command::new(router_bin()).arg("check-config").arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn shipped_example_config_is_valid() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/switchyard.toml");
    let out = Command::new(router_bin()).arg("check-config").arg(&example).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn every_command_has_help() {
    for args in [&["--help"][..], &["serve", "--help"], &["check-config", "--help"]] {
        let out = Command::new(router_bin()).args(args).output().unwrap();
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"));
    }
}
