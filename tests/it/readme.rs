//! The README's slave example, built as a user would: its `src/main.rs` and
//! its dependency lines, as a crate of its own.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The text of the first fenced block of `lang` (its info string starts
/// with it) in the README's section `heading`.
fn block<'a>(readme: &'a str, heading: &str, lang: &str) -> &'a str {
    let start = readme
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README has no section {heading:?}"));
    let section = &readme[start + 1..];
    let end = section[heading.len()..]
        .find("\n## ")
        .map_or(section.len(), |end| end + heading.len());
    let section = &section[..end];
    let fence = format!("\n```{lang}");
    let open = section
        .find(&fence)
        .unwrap_or_else(|| panic!("section {heading:?} has no ```{lang} block"));
    let body = &section[open + fence.len()..];
    let body = &body[body.find('\n').expect("fence line ends") + 1..];
    let close = body.find("\n```").expect("block is closed");
    &body[..=close]
}

/// Where the example crate is built: kept under the tests' target dir,
/// so that later runs only build what changed.
fn build_dir() -> PathBuf {
    let bin = crate::support::taskherd_bin();
    // target/<profile>/taskherd -> target/readme-slave-example
    let target = bin
        .parent()
        .and_then(Path::parent)
        .expect("the binary is in target/<profile>/");
    target.join("readme-slave-example")
}

#[test]
fn the_slave_example_builds_with_its_dependency_lines() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(repo.join("README.md")).expect("read README.md");
    let heading = "## The slave library";
    let deps = block(&readme, heading, "toml");
    let main = block(&readme, heading, "rust");
    // The published crate, as the README says, is this checkout here.
    let published = "taskherd = { version = \"0.1\",";
    assert!(deps.contains(published), "{deps}");
    let deps = deps.replace(
        published,
        &format!("taskherd = {{ path = {:?},", repo.display().to_string()),
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let krate = dir.path().join("slave-example");
    std::fs::create_dir_all(krate.join("src")).expect("mkdir");
    std::fs::write(
        krate.join("Cargo.toml"),
        format!(
            "[package]\nname = \"slave-example\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n\n{deps}"
        ),
    )
    .expect("write Cargo.toml");
    std::fs::write(krate.join("src/main.rs"), main).expect("write main.rs");
    // The versions this repository is tested with, offline.
    std::fs::copy(repo.join("Cargo.lock"), krate.join("Cargo.lock")).expect("copy Cargo.lock");

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--offline", "--quiet"])
        .current_dir(&krate)
        .env("CARGO_TARGET_DIR", build_dir())
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "the README's slave example does not build with its dependency lines:\n{}\n{deps}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Run by hand, it says how it must be run (and is no taskherd child).
    let exe = build_dir().join("debug").join("slave-example");
    let ran = Command::new(&exe)
        .env_remove("TASKHERD_CONTROL_FD")
        .output()
        .expect("run the example");
    assert_eq!(ran.status.code(), Some(2));
    let said = String::from_utf8_lossy(&ran.stderr);
    assert!(said.contains("taskherd run"), "{said}");
}
