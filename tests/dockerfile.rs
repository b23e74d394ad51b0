//! No container engine runs here, so the Dockerfile is checked against the
//! build instead: it copies every input the build needs, builds the release
//! binary this crate defines, installs exactly the tools berth calls, and its
//! entrypoint is the path it installs the binary to.
use std::path::Path;

fn dockerfile() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"))
        .expect("Dockerfile")
}

/// Dockerfile instructions with continuation lines joined.
fn instructions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        if let Some(body) = l.strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
        } else {
            cur.push_str(l);
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

#[test]
fn copies_every_build_input() {
    let ins = instructions(&dockerfile());
    let copied: Vec<&str> = ins
        .iter()
        .filter(|i| i.starts_with("COPY ") && !i.contains("--from="))
        .flat_map(|i| {
            let parts: Vec<&str> = i.split_whitespace().skip(1).collect();
            parts[..parts.len() - 1].to_vec()
        })
        .collect();
    // What `cargo build --release` reads: the manifest, the lock file, the
    // build script, the proto it compiles and the sources.
    for input in ["Cargo.toml", "Cargo.lock", "build.rs", "proto", "src"] {
        assert!(
            copied.contains(&input),
            "{input} not copied into the builder: {copied:?}"
        );
        assert!(Path::new(env!("CARGO_MANIFEST_DIR")).join(input).exists());
    }
    let build = include_str!("../build.rs");
    assert!(
        build.contains("proto/csi.proto"),
        "build.rs input moved; update the Dockerfile check"
    );
}

#[test]
fn builds_and_installs_the_berth_binary_as_entrypoint() {
    let ins = instructions(&dockerfile());
    let manifest = include_str!("../Cargo.toml");
    assert!(
        manifest.contains("[[bin]]\nname = \"berth\""),
        "binary name changed"
    );
    let run_build = ins
        .iter()
        .find(|i| i.starts_with("RUN") && i.contains("cargo build"))
        .expect("a cargo build step");
    assert!(
        run_build.contains("--release") && run_build.contains("--locked"),
        "{run_build}"
    );
    // Statically linked glibc (see the Dockerfile), so built with --target;
    // the binary goes from target/<triple>/release/berth to the runtime's
    // /usr/local/bin/berth, which is the entrypoint.
    assert!(
        run_build.contains("target-feature=+crt-static") && run_build.contains("--target"),
        "{run_build}"
    );
    assert!(run_build.contains("/release/berth"), "{run_build}");
    let staged = run_build
        .split_whitespace()
        .last()
        .expect("install destination");
    let from_builder = ins
        .iter()
        .find(|i| i.starts_with("COPY --from=builder"))
        .expect("copy from the builder");
    let parts: Vec<&str> = from_builder.split_whitespace().collect();
    assert_eq!(
        parts[2], staged,
        "the runtime copies what the builder installed"
    );
    assert_eq!(parts[3], "/usr/local/bin/berth");
    let entry = ins
        .iter()
        .find(|i| i.starts_with("ENTRYPOINT"))
        .expect("ENTRYPOINT");
    assert_eq!(entry, r#"ENTRYPOINT ["/usr/local/bin/berth"]"#);
    // Two stages: a builder and a small runtime.
    let froms: Vec<_> = ins.iter().filter(|i| i.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(
        froms[1].contains("-slim"),
        "runtime image should be slim: {}",
        froms[1]
    );
}

#[test]
fn runtime_has_exactly_the_tools_berth_calls() {
    let ins = instructions(&dockerfile());
    let install = ins
        .iter()
        .rfind(|i| i.starts_with("RUN") && i.contains("apt-get install"))
        .expect("runtime apt-get install");
    let pkgs: Vec<&str> = install
        .split("--no-install-recommends")
        .nth(1)
        .expect("--no-install-recommends")
        .split("&&")
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let mut sorted = pkgs.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["e2fsprogs", "mount", "nfs-common", "util-linux", "xfsprogs"]
    );
}
