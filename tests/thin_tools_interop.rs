//! Format interoperability with thin-provisioning-tools 0.9.0, both ways (acceptance test 2):
//!
//! (a) images written by `pdata::thin::PoolMetadata` after ≥ 10,000 random operations on ≥ 8
//!     devices, snapshots of snapshots included, pass `thin_check`, and `thin_dump` prints
//!     exactly the model's XML — as does `thin-meta dump` (and `-m` for a held root) — and
//!     `thin_ls` reports the model's mapped, exclusive and shared block counts, and
//!     `thin_delta` the model's differences between devices;
//! (b) images made by `thin_restore` from generated XML (single and range mappings, shared
//!     data blocks, several devices) open in pdata with exactly the XML's mappings, take
//!     further random changes (a held root among them), and still pass `thin_check` and
//!     `thin-meta check`, dumping to the model's XML;
//! (c) `thin-meta restore` of such XML, then `thin_dump`, gives the XML back, and bad input
//!     to `thin-meta` is a one-line error with exit status 1.
//!
//! A missing tool fails the test under `CI=true` and skips it loudly otherwise. Seeds are
//! printed; `PDATA_SEED=<n>` replays.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pdata::testing::{require_tool, Harness, ModelState, Op, Rng, Workload};
use pdata::thin::check::{check, CheckOptions};
use pdata::thin::dump::read_superblock;
use pdata::thin::xml::{self, DeviceXml, MappingRun, PoolXml};
use pdata::thin::CacheOpts;
use pdata::{BlockIo, MemBlockIo};

struct Tools {
    check: PathBuf,
    dump: PathBuf,
    restore: PathBuf,
    ls: PathBuf,
    delta: PathBuf,
}

fn tools() -> Option<Tools> {
    Some(Tools {
        check: require_tool("thin_check")?,
        dump: require_tool("thin_dump")?,
        restore: require_tool("thin_restore")?,
        ls: require_tool("thin_ls")?,
        delta: require_tool("thin_delta")?,
    })
}

fn thin_meta() -> &'static str {
    env!("CARGO_BIN_EXE_thin-meta")
}

fn run(cmd: &Path, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", cmd.display()))
}

fn stdout_of(cmd: &Path, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}",
        cmd.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// What `thin_ls -o DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS` prints for `state`
/// (columns single-spaced): a mapping is exclusive when no other mapping, in any device, maps
/// its data block (thin_ls 0.9.0's rule, checked against the tool).
fn thin_ls_expected(state: &ModelState) -> String {
    let mut users: std::collections::HashMap<u64, u64> = Default::default();
    for d in state.devices.values() {
        for &(b, _) in d.mappings.values() {
            *users.entry(b).or_insert(0) += 1;
        }
    }
    let mut out = String::new();
    for (dev, d) in &state.devices {
        let n = d.mappings.len();
        let excl = d
            .mappings
            .values()
            .filter(|m| users.get(&m.0) == Some(&1))
            .count();
        out += &format!("{dev} {n} {excl} {}\n", n - excl);
    }
    out
}

/// What `thin_delta --snap1 A --snap2 B` prints for `state`: the union of both devices'
/// mapped blocks in order, each classed `same` (same data block), `different`, `left_only` or
/// `right_only`, consecutive blocks of one class merged into a run (checked against the tool).
fn thin_delta_expected(s: &ModelState, dbs: u32, held_root: u64, a: u64, b: u64) -> String {
    let empty = Default::default();
    let l = s.devices.get(&a).map_or(&empty, |d| &d.mappings);
    let r = s.devices.get(&b).map_or(&empty, |d| &d.mappings);
    let mut keys: Vec<u64> = l.keys().chain(r.keys()).copied().collect();
    keys.sort_unstable();
    keys.dedup();
    // A held metadata snapshot is named in the header.
    let snap = if held_root == 0 {
        String::new()
    } else {
        format!(" metadata_snap=\"{held_root}\"")
    };
    let mut out = format!(
        "<superblock uuid=\"\" time=\"{}\" transaction=\"{}\" data_block_size=\"{dbs}\" \
         nr_data_blocks=\"{}\"{snap}>\n  <diff left=\"{a}\" right=\"{b}\">\n",
        s.time, s.transaction_id, s.nr_data_blocks
    );
    let mut runs: Vec<(&str, u64, u64)> = Vec::new();
    for k in keys {
        let class = match (l.get(&k), r.get(&k)) {
            (Some(x), Some(y)) if x.0 == y.0 => "same",
            (Some(_), Some(_)) => "different",
            (Some(_), None) => "left_only",
            _ => "right_only",
        };
        match runs.last_mut() {
            Some((c, begin, len)) if *c == class && *begin + *len == k => *len += 1,
            _ => runs.push((class, k, 1)),
        }
    }
    for (class, begin, len) in runs {
        out += &format!("    <{class} begin=\"{begin}\" length=\"{len}\"/>\n");
    }
    out + "  </diff>\n</superblock>\n"
}

/// The data_block_size attribute of a dump.
fn data_block_size(dump: &str) -> u32 {
    xml::parse(dump).map(|p| p.data_block_size).unwrap_or(0)
}

fn single_spaced(text: &str) -> String {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") + "\n")
        .collect()
}

/// Writes `img` to a temp file and checks it with thin_check, thin_dump and thin-meta.
fn verify_with_tools(t: &Tools, img: &[u8], state: &ModelState, want: &str, held: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.img");
    std::fs::write(&path, img).unwrap();
    let p = path.to_str().unwrap();
    let out = run(&t.check, &[p]);
    assert!(
        out.status.success(),
        "thin_check rejects the image: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout_of(&t.dump, &[p]),
        want,
        "thin_dump differs from the model"
    );
    assert_eq!(
        stdout_of(Path::new(thin_meta()), &["dump", p]),
        want,
        "thin-meta dump differs"
    );
    let ls = stdout_of(
        &t.ls,
        &[
            "--no-headers",
            "-o",
            "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS",
            p,
        ],
    );
    assert_eq!(
        single_spaced(&ls),
        thin_ls_expected(state),
        "thin_ls differs from the model"
    );
    // thin_delta between a few pairs of devices (snapshots and their origins among them).
    let sb = read_superblock(&MemBlockIo::from_image(img.to_vec()).unwrap(), 0).unwrap();
    let held_root = sb.held_root;
    let devs: Vec<u64> = state.devices.keys().copied().collect();
    let last_first = devs.first().zip(devs.last()).map(|(a, b)| (*b, *a));
    let pairs = devs.windows(2).map(|w| (w[0], w[1])).chain(last_first);
    for (a, b) in pairs.take(4) {
        let (sa, sb) = (a.to_string(), b.to_string());
        let got = stdout_of(&t.delta, &["--snap1", &sa, "--snap2", &sb, p]);
        let expect = thin_delta_expected(state, data_block_size(want), held_root, a, b);
        assert_eq!(got, expect, "thin_delta {a} {b} differs from the model");
    }
    let out = run(Path::new(thin_meta()), &["check", "--exact", p]);
    assert!(
        out.status.success(),
        "thin-meta check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some(held) = held {
        assert_eq!(
            stdout_of(&t.dump, &["-m", p]),
            held,
            "thin_dump -m differs from the held model"
        );
        assert_eq!(stdout_of(Path::new(thin_meta()), &["dump", p, "-m"]), held);
        let out = run(&t.check, &["-m", p]);
        assert!(
            out.status.success(),
            "thin_check -m: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn mem_factory(io: &MemBlockIo) -> pdata::testing::IoFactory {
    let io = io.clone();
    Box::new(move || Box::new(io.clone()) as Box<dyn BlockIo>)
}

#[test]
fn pdata_images_pass_thin_check_and_dump_to_the_model() {
    let Some(t) = tools() else { return };
    let seed = Rng::seed_from_env("PDATA_SEED");
    println!("interop (a): seed {seed} (PDATA_SEED={seed} replays)");
    let mut rng = Rng::new(seed);
    let io = MemBlockIo::new(4096);
    let opts = CacheOpts {
        nr_cache_blocks: 256,
    };
    let mut h = Harness::format(mem_factory(&io), 128, 200_000, opts).unwrap();
    let w = Workload {
        dev_id_pool: 40,
        max_devices: 14,
        vblock_space: 6000,
        removal_pct: 35,
        commit_pct: 2,
        abort_pct: 1,
        reopen_pct: 1,
        held_roots: true,
    };
    let nr_ops = 12_000;
    let (mut snaps_of_snaps, mut tool_checks, mut max_devices, mut max_mappings) = (0, 0, 0, 0);
    let mut snapshots: std::collections::BTreeSet<u64> = Default::default();
    for i in 0..nr_ops {
        let op = h.random_op(&w, &mut rng);
        if let Op::CreateSnap { dev, origin } = op {
            if snapshots.contains(&origin) && !h.current.devices.contains_key(&dev) {
                snaps_of_snaps += 1;
            }
            snapshots.insert(dev);
        }
        if let Err(e) = h.apply(&op) {
            panic!("seed {seed} op #{i} {op:?}: {e}");
        }
        if i % 64 == 0 {
            h.verify_live(&mut rng)
                .unwrap_or_else(|e| panic!("seed {seed} op #{i} {op:?}: {e}"));
        }
        // Check every 40th commit and the final state with the real tools.
        if (op == Op::Commit && rng.chance(1, 12)) || i == nr_ops - 1 {
            if i == nr_ops - 1 {
                h.apply(&Op::Commit).unwrap();
            }
            let held = h.held_xml().map(|x| x.to_xml());
            verify_with_tools(
                &t,
                &io.image(),
                &h.committed,
                &h.committed_xml().to_xml(),
                held.as_deref(),
            );
            tool_checks += 1;
            max_devices = max_devices.max(h.committed.devices.len());
            max_mappings = max_mappings.max(h.committed.nr_mappings());
        }
    }
    println!(
        "interop (a): {nr_ops} ops, {tool_checks} images checked by thin_check/thin_dump, up to \
         {max_devices} devices and {max_mappings} mappings, {snaps_of_snaps} snapshots of \
         snapshots; ops: {:?}",
        h.counts
    );
    assert!(max_devices >= 8, "only {max_devices} devices");
    assert!(snaps_of_snaps > 0);
    assert!(tool_checks >= 5);
}

/// Random XML: several devices with single and range mappings, some sharing data blocks.
fn random_xml(rng: &mut Rng) -> PoolXml {
    let nr_data_blocks = 40_000 + rng.below(40_000);
    let time = 1 + rng.below(20) as u32;
    let mut devices: Vec<DeviceXml> = Vec::new();
    let mut next_data = 1 + rng.below(100);
    let nr_devices = 3 + rng.below(6);
    let mut ids: Vec<u64> = (0..nr_devices).map(|_| rng.below(1 << 24)).collect();
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        let mut singles: std::collections::BTreeMap<u64, (u64, u32)> = Default::default();
        let mut v = rng.below(50);
        for _ in 0..rng.below(40) {
            let len = if rng.chance(1, 2) {
                1
            } else {
                1 + rng.below(400)
            };
            let t = rng.below(u64::from(time) + 1) as u32;
            for k in 0..len {
                singles.insert(v + k, (next_data + k, t));
            }
            next_data += len + rng.below(3);
            v += len + rng.below(600);
        }
        // Share some blocks with an earlier device (as restore of a snapshot would).
        if let Some(prev) = devices.last() {
            for (o, d, t) in prev.singles().filter(|_| rng.chance(1, 3)).take(300) {
                singles.insert(o, (d, t));
            }
        }
        let ctime = rng.below(u64::from(time) + 1) as u32;
        let mut dev = DeviceXml {
            dev_id: id,
            mapped_blocks: singles.len() as u64,
            transaction: rng.below(10),
            creation_time: ctime,
            snap_time: ctime + rng.below(u64::from(time - ctime) + 1) as u32,
            mappings: Vec::new(),
        };
        dev.set_singles(singles.iter().map(|(&o, &(d, t))| (o, d, t)));
        devices.push(dev);
    }
    assert!(next_data < nr_data_blocks);
    PoolXml {
        uuid: String::new(),
        time,
        transaction: rng.below(100),
        flags: 0,
        version: 2,
        data_block_size: 128 * (1 + rng.below(8) as u32),
        nr_data_blocks,
        devices,
    }
}

fn restore_with_thin_restore(t: &Tools, xml_text: &str, blocks: u64) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let (x, img) = (dir.path().join("in.xml"), dir.path().join("meta.img"));
    std::fs::write(&x, xml_text).unwrap();
    std::fs::File::create(&img)
        .unwrap()
        .set_len(blocks * 4096)
        .unwrap();
    let out = run(
        &t.restore,
        &["-i", x.to_str().unwrap(), "-o", img.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "thin_restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&img).unwrap()
}

#[test]
fn thin_restore_images_open_in_pdata_and_take_changes() {
    let Some(t) = tools() else { return };
    let seed = Rng::seed_from_env("PDATA_SEED");
    println!("interop (b): seed {seed} (PDATA_SEED={seed} replays)");
    let mut rng = Rng::new(seed);
    let (mut nr_images, mut nr_mappings, mut nr_ops) = (0, 0, 0);
    for round in 0..6 {
        let pool = random_xml(&mut rng);
        let text = pool.to_xml();
        let img = restore_with_thin_restore(&t, &text, 2048);
        let io = MemBlockIo::from_image(img).unwrap();
        // The restored image is what the XML says, to our checker and our dumper.
        let report = check(&io, &CheckOptions::default());
        assert!(report.is_clean(), "round {round}: {report}");
        let state = ModelState::from_xml(&pool);
        let opts = CacheOpts {
            nr_cache_blocks: 64,
        };
        let mut h =
            Harness::open(mem_factory(&io), pool.data_block_size, state, None, opts).unwrap();
        h.verify_live(&mut rng)
            .unwrap_or_else(|e| panic!("seed {seed} round {round}: {e}"));
        nr_mappings += h.current.nr_mappings();
        // Change it: a held root first (taken on the restored image), then random ops.
        h.apply(&Op::ReserveSnap).unwrap();
        let w = Workload {
            vblock_space: 20_000,
            held_roots: round % 2 == 0,
            ..Workload::default()
        };
        for i in 0..400 {
            let op = h.random_op(&w, &mut rng);
            if let Err(e) = h.apply(&op) {
                panic!("seed {seed} round {round} op #{i} {op:?}: {e}");
            }
            nr_ops += 1;
        }
        h.verify_live(&mut rng)
            .unwrap_or_else(|e| panic!("seed {seed} round {round}: {e}"));
        h.apply(&Op::Commit).unwrap();
        let held = h.held_xml().map(|x| x.to_xml());
        verify_with_tools(
            &t,
            &io.image(),
            &h.committed,
            &h.committed_xml().to_xml(),
            held.as_deref(),
        );
        nr_images += 1;
    }
    println!(
        "interop (b): {nr_images} thin_restore images, {nr_mappings} mappings read, {nr_ops} ops"
    );
}

#[test]
fn thin_meta_restore_round_trips_through_thin_dump() {
    let Some(t) = tools() else { return };
    let seed = Rng::seed_from_env("PDATA_SEED");
    println!("interop (c): seed {seed} (PDATA_SEED={seed} replays)");
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut inputs: Vec<String> = ["empty", "two-devices", "many-devices", "mixed"]
        .iter()
        .map(|n| std::fs::read_to_string(fixtures.join(format!("{n}.xml"))).unwrap())
        .collect();
    inputs.extend((0..8).map(|_| random_xml(&mut rng).to_xml()));
    for (i, text) in inputs.iter().enumerate() {
        let (x, img) = (
            dir.path().join("in.xml"),
            dir.path().join(format!("m{i}.img")),
        );
        std::fs::write(&x, text).unwrap();
        std::fs::File::create(&img)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let (xs, is) = (x.to_str().unwrap(), img.to_str().unwrap());
        let out = run(Path::new(thin_meta()), &["restore", "-i", xs, "-o", is]);
        assert!(
            out.status.success(),
            "thin-meta restore: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = run(&t.check, &[is]);
        assert!(
            out.status.success(),
            "thin_check: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(&stdout_of(&t.dump, &[is]), text, "input {i}");
        // And our parser/emitter agree with thin_dump's rendering of the same XML.
        assert_eq!(&xml::parse(text).unwrap().to_xml(), text);
    }
    println!(
        "interop (c): {} XML documents restored by thin-meta and dumped by thin_dump",
        inputs.len()
    );
}

#[test]
fn thin_meta_reports_bad_input_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let tm = Path::new(thin_meta());
    let garbage = dir.path().join("garbage.img");
    let mut rng = Rng::new(7);
    let bytes: Vec<u8> = (0..64 * 4096).map(|_| rng.next_u64() as u8).collect();
    std::fs::write(&garbage, &bytes).unwrap();
    let bad_xml = dir.path().join("bad.xml");
    std::fs::write(&bad_xml, "<superblock uuid=\"\" time=\"x\">").unwrap();
    let out_img = dir.path().join("out.img");
    std::fs::File::create(&out_img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let g = garbage.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["check", g],
        vec!["dump", g],
        vec!["dump", "/nonexistent/meta"],
        vec!["check", "/nonexistent/meta"],
        vec![
            "restore",
            "-i",
            bad_xml.to_str().unwrap(),
            "-o",
            out_img.to_str().unwrap(),
        ],
        vec![
            "restore",
            "-i",
            "/nonexistent.xml",
            "-o",
            out_img.to_str().unwrap(),
        ],
        vec![
            "restore",
            "-i",
            bad_xml.to_str().unwrap(),
            "-o",
            "/nonexistent/out.img",
        ],
    ];
    for args in cases {
        let out = run(tm, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        if args[0] != "check" || args[1] != g {
            assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        }
    }
    // A clean restored image checks clean (exit 0).
    let ok_xml = dir.path().join("ok.xml");
    let pool = PoolXml {
        version: 2,
        data_block_size: 128,
        nr_data_blocks: 100,
        devices: vec![DeviceXml {
            dev_id: 1,
            mapped_blocks: 2,
            mappings: vec![MappingRun {
                origin_begin: 5,
                data_begin: 7,
                length: 2,
                time: 0,
            }],
            ..DeviceXml::default()
        }],
        ..PoolXml::default()
    };
    std::fs::write(&ok_xml, pool.to_xml()).unwrap();
    let o = out_img.to_str().unwrap();
    assert!(
        run(tm, &["restore", "-i", ok_xml.to_str().unwrap(), "-o", o])
            .status
            .success()
    );
    assert!(run(tm, &["check", o]).status.success());
    assert_eq!(stdout_of(tm, &["dump", o]), pool.to_xml());
}
