//! PoolMetadata tests: smoke, reopen, snapshots, held root, resize, errors, and a quick
//! interop check of written images with the installed `thin_check` / `thin_dump`.

use std::collections::BTreeMap;

use super::*;
use crate::block_io::MemBlockIo;

fn opts() -> CacheOpts {
    CacheOpts {
        nr_cache_blocks: 256,
    }
}

fn new_pool(nr_meta: u64, nr_data: u64) -> (MemBlockIo, PoolMetadata) {
    let io = MemBlockIo::new(nr_meta);
    let pmd = PoolMetadata::format(Box::new(io.clone()), 128, nr_data, opts()).unwrap();
    (io, pmd)
}

#[test]
fn format_then_open_empty_pool() {
    let (io, pmd) = new_pool(1024, 40_000);
    assert_eq!(pmd.data_nr_blocks(), 40_000);
    assert_eq!(pmd.data_nr_free(), 40_000);
    assert_eq!(pmd.metadata_nr_blocks(), 1024);
    let used = pmd.metadata_nr_blocks() - pmd.metadata_nr_free();
    drop(pmd);
    let mut pmd = PoolMetadata::open(Box::new(io.clone()), 128, opts()).unwrap();
    assert_eq!(pmd.devices().unwrap(), vec![]);
    assert_eq!(pmd.metadata_nr_blocks() - pmd.metadata_nr_free(), used);
    assert_eq!(pmd.data_nr_free(), 40_000);
}

#[test]
fn smoke_thins_snapshots_inserts_reopen() {
    let (io, mut pmd) = new_pool(2048, 100_000);
    for id in 0..3 {
        pmd.create_thin(DevId(id)).unwrap();
    }
    let mut model: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    for id in 0..3u64 {
        for v in 0..700u64 {
            let d = pmd.alloc_data_block().unwrap();
            pmd.insert_block(DevId(id), ThinBlock(v * 3 + id), d)
                .unwrap();
            model.insert((id, v * 3 + id), d.0);
        }
    }
    pmd.commit().unwrap();
    pmd.create_snap(DevId(10), DevId(1)).unwrap();
    pmd.create_snap(DevId(11), DevId(10)).unwrap();
    for ((id, v), d) in model.clone() {
        if id == 1 {
            model.insert((10, v), d);
            model.insert((11, v), d);
        }
    }
    assert_eq!(pmd.time(), 2);
    // Break sharing in the snapshot of the snapshot and remove some mappings of the origin.
    for v in (1..300u64).step_by(3) {
        let d = pmd.alloc_data_block().unwrap();
        pmd.insert_block(DevId(11), ThinBlock(v), d).unwrap();
        model.insert((11, v), d.0);
    }
    for v in (1..600u64).step_by(6) {
        assert!(pmd.remove_block(DevId(1), ThinBlock(v)).unwrap());
        model.remove(&(1, v));
    }
    pmd.commit().unwrap();
    let check = |pmd: &mut PoolMetadata, model: &BTreeMap<(u64, u64), u64>| {
        for (&(id, v), &d) in model {
            let l = pmd.find_block(DevId(id), ThinBlock(v)).unwrap().unwrap();
            assert_eq!(l.data_block, DataBlock(d), "dev {id} block {v}");
        }
        for id in [0u64, 1, 2, 10, 11] {
            let n = model.keys().filter(|(i, _)| *i == id).count() as u64;
            assert_eq!(
                pmd.device_details(DevId(id))
                    .unwrap()
                    .unwrap()
                    .mapped_blocks,
                n
            );
            let got: Vec<u64> = pmd
                .mappings(DevId(id), ThinBlock(0), ThinBlock(u64::MAX))
                .map(|r| r.unwrap().0 .0)
                .collect();
            let want: Vec<u64> = model
                .keys()
                .filter(|(i, _)| *i == id)
                .map(|k| k.1)
                .collect();
            assert_eq!(got, want, "dev {id}");
        }
    };
    check(&mut pmd, &model);
    let l = pmd.find_block(DevId(10), ThinBlock(4)).unwrap().unwrap();
    assert!(l.shared);
    let l = pmd.find_block(DevId(11), ThinBlock(1)).unwrap().unwrap();
    assert!(!l.shared);
    drop(pmd);
    let mut pmd = PoolMetadata::open(Box::new(io.clone()), 128, opts()).unwrap();
    check(&mut pmd, &model);
    assert_eq!(
        pmd.devices().unwrap(),
        [0, 1, 2, 10, 11].map(DevId).to_vec()
    );
    assert_eq!(pmd.time(), 2);
}

/// Run the installed `thin_check` on the image (must exit 0 with no complaints) and return
/// `thin_dump` output. A missing tool is a failure (STYLE rule 24).
pub(crate) fn thin_check_and_dump(io: &MemBlockIo) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.img");
    std::fs::write(&path, io.image()).unwrap();
    let out = std::process::Command::new("thin_check")
        .arg(&path)
        .output()
        .expect("thin_check (thin-provisioning-tools) must be installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "thin_check failed: {stderr}");
    let out = std::process::Command::new("thin_dump")
        .arg(&path)
        .output()
        .expect("thin_dump");
    assert!(out.status.success(), "thin_dump failed");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn written_images_pass_thin_check() {
    let (io, mut pmd) = new_pool(1024, 40_000);
    let dump = thin_check_and_dump(&io);
    assert!(dump.contains("nr_data_blocks=\"40000\""), "{dump}");
    pmd.create_thin(DevId(1)).unwrap();
    pmd.create_thin(DevId(2)).unwrap();
    for v in 0..2000u64 {
        let d = pmd.alloc_data_block().unwrap();
        pmd.insert_block(DevId(1), ThinBlock(v * 7 % 2003), d)
            .unwrap();
    }
    pmd.set_transaction_id(0, 5).unwrap();
    pmd.commit().unwrap();
    thin_check_and_dump(&io);
    pmd.create_snap(DevId(3), DevId(1)).unwrap();
    for v in 0..300u64 {
        let d = pmd.alloc_data_block().unwrap();
        pmd.insert_block(DevId(3), ThinBlock(v), d).unwrap();
    }
    pmd.remove_range(DevId(1), ThinBlock(500), ThinBlock(1500))
        .unwrap();
    pmd.commit().unwrap();
    let dump = thin_check_and_dump(&io);
    assert!(dump.contains("transaction=\"5\""), "{dump}");
    pmd.reserve_metadata_snap().unwrap();
    pmd.delete_thin(DevId(2)).unwrap();
    for v in 0..100u64 {
        let d = pmd.alloc_data_block().unwrap();
        pmd.insert_block(DevId(1), ThinBlock(v), d).unwrap();
    }
    pmd.commit().unwrap();
    thin_check_and_dump(&io);
    pmd.release_metadata_snap().unwrap();
    pmd.delete_thin(DevId(1)).unwrap();
    pmd.commit().unwrap();
    thin_check_and_dump(&io);
}
