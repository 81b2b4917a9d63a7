use super::*;

fn run(args: &[&str]) -> Result<Options, CliError> {
    match parse_args(args)? {
        Command::Run(o) => Ok(*o),
        Command::Help => panic!("unexpected help"),
    }
}

const BASE: [&str; 8] = ["-q", "128", "-o", "4096", "-w", "randread", "-t", "1"];

fn with(extra: &[&'static str]) -> Vec<&'static str> {
    let mut v = BASE.to_vec();
    v.extend_from_slice(extra);
    v
}

#[test]
fn parses_spdk_flags() {
    let o = run(&with(&[
        "-m", "0x3", "-T", "Malloc0", "-C", "--json", "c.json", "-S", "2",
    ]))
    .unwrap();
    assert_eq!(o.queue_depth, 128);
    assert_eq!(o.io_size_bytes, 4096);
    assert_eq!(o.workload, Workload::RandRead);
    assert_eq!(o.time_secs, 1.0);
    assert_eq!(o.cores, vec![0, 1]);
    assert_eq!(o.only_bdev.as_deref(), Some("Malloc0"));
    assert!(o.every_core_every_bdev);
    assert_eq!(o.json_config, Some(PathBuf::from("c.json")));
    assert_eq!(o.progress_interval_secs, Some(2));
    assert_eq!(o.rw_read_percent, None);
}

#[test]
fn inline_values_and_defaults() {
    let o = run(&[
        "-q32",
        "-o128K",
        "-wrandrw",
        "-M70",
        "-t",
        "0.5",
        "--json=x.json",
    ])
    .unwrap();
    assert_eq!(o.queue_depth, 32);
    assert_eq!(o.io_size_bytes, 128 * 1024);
    assert_eq!(o.rw_read_percent, Some(70));
    assert_eq!(o.time_secs, 0.5);
    assert_eq!(o.cores, vec![0]);
    assert!(!o.every_core_every_bdev);
}

#[test]
fn sizes() {
    assert_eq!(parse_size("4096").unwrap(), 4096);
    assert_eq!(parse_size("4k").unwrap(), 4096);
    assert_eq!(parse_size("128K").unwrap(), 131072);
    assert_eq!(parse_size("1M").unwrap(), 1 << 20);
    assert_eq!(parse_size("4KiB").unwrap(), 4096);
    for bad in [
        "",
        "k",
        "0",
        "4x",
        "-4",
        "4.5k",
        "99999999999999999999",
        "1T",
        "128M",
    ] {
        assert!(parse_size(bad).is_err(), "{bad} accepted");
    }
}

#[test]
fn core_masks() {
    assert_eq!(parse_core_mask("0x1").unwrap(), vec![0]);
    assert_eq!(parse_core_mask("3").unwrap(), vec![0, 1]);
    assert_eq!(parse_core_mask("0x10").unwrap(), vec![4]);
    assert_eq!(parse_core_mask("[0,2-3]").unwrap(), vec![0, 2, 3]);
    for bad in ["0x0", "", "0xg", "[]", "[3-1]", "[a]"] {
        assert!(parse_core_mask(bad).is_err(), "{bad} accepted");
    }
    let beyond_max_core = format!("0x1{}", "0".repeat(MAX_CORE / 4 + 1));
    assert!(parse_core_mask(&beyond_max_core).is_err());
    assert!(parse_core_mask("[0-5000]").is_err());
    assert_eq!(format_core_mask(&[0]), "1");
    assert_eq!(format_core_mask(&[0, 1]), "3");
    assert_eq!(format_core_mask(&[4, 9]), "210");
}

#[test]
fn bad_input_is_one_line_error() {
    let cases: Vec<Vec<&str>> = vec![
        vec!["-q", "0", "-o", "4096", "-w", "read", "-t", "1"],
        vec!["-q", "100000", "-o", "4096", "-w", "read", "-t", "1"],
        vec!["-q", "x", "-o", "4096", "-w", "read", "-t", "1"],
        vec!["-q", "1", "-o", "4096", "-w", "readd", "-t", "1"],
        vec!["-q", "1", "-o", "4096", "-w", "read", "-t", "0"],
        vec!["-q", "1", "-o", "4096", "-w", "read", "-t", "nan"],
        vec!["-q", "1", "-o", "4096", "-w", "rw", "-t", "1"],
        vec!["-q", "1", "-o", "4096", "-w", "rw", "-t", "1", "-M", "101"],
        vec!["-q", "1", "-o", "4096", "-w", "read"],
        vec!["-q", "1", "-o", "4096", "-w", "read", "-t", "1", "-Z"],
        vec!["-q", "1", "-o", "4096", "-w", "read", "-t", "1", "-Cx"],
        vec![
            "-q",
            "1",
            "-o",
            "4096",
            "-w",
            "read",
            "-t",
            "1",
            "--help=yes",
        ],
        vec!["-q", "1", "-o", "4096", "-w", "read", "-t", "1", "-q", "2"],
        vec!["-q", "1", "-o", "4096", "-w", "read", "-t", "1", "-T"],
        vec!["-q", "4096", "-o", "1M", "-w", "verify", "-t", "1"],
        vec![
            "-q",
            "1",
            "-o",
            "4096",
            "-w",
            "read",
            "-t",
            "1",
            "--inject-corruption",
            "3",
        ],
    ];
    for args in cases {
        let e = run(&args).expect_err(&format!("{args:?} accepted"));
        assert!(!e.0.is_empty() && !e.0.contains('\n'), "{args:?}: {e}");
    }
}

#[test]
fn workload_error_lists_choices() {
    let e = run(&["-q", "1", "-o", "4k", "-w", "bogus", "-t", "1"]).unwrap_err();
    assert!(e.0.contains("bogus") && e.0.contains("write_zeroes"), "{e}");
}

#[test]
fn help() {
    assert_eq!(parse_args(["-h"]).unwrap(), Command::Help);
    assert_eq!(parse_args(["-q", "1", "--help"]).unwrap(), Command::Help);
}
