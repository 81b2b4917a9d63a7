//! `thind`: the thinbdev daemon. Placeholder until the daemon issue lands.

fn main() {
    eprintln!("thind: the daemon is not built yet; see README.md");
    std::process::exit(1);
}
