//! `thin-meta`: offline dm-thin metadata tools. Placeholder until pdata lands.

fn main() {
    eprintln!("thin-meta: not built yet");
    std::process::exit(1);
}
