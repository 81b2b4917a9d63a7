//! `bdevperf`: placeholder until the reactor/bdev issue lands.

fn main() {
    eprintln!("bdevperf: not built yet");
    std::process::exit(1);
}
