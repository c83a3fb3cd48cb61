use super::*;

#[test]
fn ldd_lines_give_the_libraries_and_the_loader_but_not_the_vdso() {
    let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1)\n\
                \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
    let libraries = parse_ldd(text).unwrap();
    assert_eq!(
        libraries,
        vec![
            Library {
                path: "/lib/x86_64-linux-gnu/libgcc_s.so.1".into(),
                loader: false
            },
            Library {
                path: "/lib/x86_64-linux-gnu/libc.so.6".into(),
                loader: false
            },
            Library {
                path: "/lib64/ld-linux-x86-64.so.2".into(),
                loader: true
            },
        ]
    );
    let missing = parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err();
    assert!(missing.to_string().contains("libfoo.so.1"), "{missing}");
    assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
}

fn files() -> Vec<LayerFile> {
    vec![
        LayerFile {
            path: "usr/local/bin/draingate".into(),
            data: b"\x7fELF program".to_vec(),
            mode: 0o755,
        },
        LayerFile {
            path: "lib64/ld-linux-x86-64.so.2".into(),
            data: b"loader".to_vec(),
            mode: 0o755,
        },
        LayerFile {
            path: "lib/x86_64-linux-gnu/libc.so.6".into(),
            data: b"libc".to_vec(),
            mode: 0o644,
        },
    ]
}

#[test]
fn the_layer_is_sorted_owned_by_root_and_carries_one_time() {
    let tar = layer_tar(&files(), 1_700_000_000).unwrap();
    let mut archive = tar::Archive::new(tar.as_slice());
    let entries: Vec<(String, u32, u64, u64, u64)> = archive
        .entries()
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let header = entry.header();
            (
                entry.path().unwrap().to_string_lossy().into_owned(),
                header.mode().unwrap(),
                header.uid().unwrap(),
                header.gid().unwrap(),
                header.mtime().unwrap(),
            )
        })
        .collect();
    let paths: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        paths,
        [
            "lib/",
            "lib/x86_64-linux-gnu/",
            "lib/x86_64-linux-gnu/libc.so.6",
            "lib64/",
            "lib64/ld-linux-x86-64.so.2",
            "usr/",
            "usr/local/",
            "usr/local/bin/",
            "usr/local/bin/draingate",
        ]
    );
    assert!(
        entries
            .iter()
            .all(|e| e.2 == 0 && e.3 == 0 && e.4 == 1_700_000_000)
    );
    assert_eq!(entries[2].1, 0o644);
    assert_eq!(entries[8].1, 0o755);
    assert!(
        layer_tar(
            &[LayerFile {
                path: "../etc/passwd".into(),
                data: Vec::new(),
                mode: 0o644
            }],
            0
        )
        .is_err()
    );
}

#[test]
fn the_same_inputs_give_the_same_digest_and_another_time_another() {
    let base = std::env::temp_dir().join(format!("xtask-image-{}", std::process::id()));
    let labels = BTreeMap::from([(
        "org.opencontainers.image.revision".to_owned(),
        "abc".to_owned(),
    )]);
    let first = write_layout(&base.join("a"), &files(), 1_700_000_000, &labels, "1").unwrap();
    // Another directory, another order of files.
    let mut reversed = files();
    reversed.reverse();
    let second = write_layout(&base.join("b"), &reversed, 1_700_000_000, &labels, "1").unwrap();
    assert_eq!(first, second);
    for dir in ["a", "b"] {
        let manifest = fs::read(
            base.join(dir)
                .join("blobs/sha256")
                .join(first.manifest_digest.trim_start_matches("sha256:")),
        )
        .unwrap();
        assert_eq!(
            format!("sha256:{}", hex(&Sha256::digest(&manifest))),
            first.manifest_digest
        );
    }
    let index: Value =
        serde_json::from_slice(&fs::read(base.join("a/index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["digest"],
        json!(first.manifest_digest)
    );
    let later = write_layout(&base.join("c"), &files(), 1_700_000_001, &labels, "1").unwrap();
    assert_ne!(later.manifest_digest, first.manifest_digest);
    let _ = fs::remove_dir_all(&base);
}
