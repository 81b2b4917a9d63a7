use std::collections::HashSet;

use super::*;

#[test]
fn names_round_trip() {
    for w in Workload::ALL {
        assert_eq!(w.name().parse::<Workload>().unwrap(), w);
    }
    assert!("READ".parse::<Workload>().is_err());
}

#[test]
fn sequential_walks_and_wraps() {
    let mut g = Generator::new(Workload::Write, 0, 5, 1);
    let units: Vec<u64> = (0..12).map(|_| g.next_unit()).collect();
    assert_eq!(units, [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]);
}

#[test]
fn random_covers_range_uniformly() {
    let n = 64;
    let mut g = Generator::new(Workload::RandRead, 0, n, 42);
    let mut counts = vec![0u32; n as usize];
    for _ in 0..64_000 {
        let u = g.next_unit();
        assert!(u < n);
        counts[u as usize] += 1;
    }
    // Each unit expects 1000 hits; a uniform draw stays well within ±25 %.
    assert!(
        counts.iter().all(|&c| (750..1250).contains(&c)),
        "{counts:?}"
    );
}

#[test]
fn random_is_deterministic_per_seed() {
    let draw = |seed| {
        let mut g = Generator::new(Workload::RandWrite, 0, 1 << 30, seed);
        (0..100).map(|_| g.next_unit()).collect::<Vec<_>>()
    };
    assert_eq!(draw(7), draw(7));
    assert_ne!(draw(7), draw(8));
    assert_eq!(draw(7).into_iter().collect::<HashSet<_>>().len(), 100);
}

#[test]
fn mix_honours_read_percentage() {
    for pct in [0, 30, 70, 100] {
        let mut g = Generator::new(Workload::RandRw, pct, 100, 3);
        let reads = (0..100_000).filter(|_| g.next_op() == Op::Read).count();
        let expected = pct as usize * 1000;
        assert!(reads.abs_diff(expected) <= 1500, "pct {pct}: {reads} reads");
    }
}

#[test]
fn ops_per_workload() {
    let op = |w| Generator::new(w, 50, 10, 0).next_op();
    assert_eq!(op(Workload::Read), Op::Read);
    assert_eq!(op(Workload::RandWrite), Op::Write);
    assert_eq!(op(Workload::Verify), Op::Write);
    assert_eq!(op(Workload::Unmap), Op::Unmap);
    assert_eq!(op(Workload::Flush), Op::Flush);
    assert_eq!(op(Workload::WriteZeroes), Op::WriteZeroes);
    assert!(!Workload::Unmap.needs_buffers());
    assert!(Workload::Verify.needs_buffers());
}

#[test]
fn below_stays_below() {
    let mut r = Rng::new(0);
    for n in [1u64, 2, 3, 1000, u64::MAX] {
        for _ in 0..1000 {
            assert!(r.below(n) < n);
        }
    }
}
