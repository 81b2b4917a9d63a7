"""spdk-rpc plugin for thinbdev's thin pools and thin bdevs.

Usage (with this directory on PYTHONPATH):
    spdk-rpc --plugin thin_rpc bdev_thin_pool_create -n pool0 -d data0 -m meta0
    spdk-rpc --plugin thin_rpc bdev_thin_create -p pool0 -n thin0 -s 1024

Every command sends exactly the parameters the thind method documents; options left out are
not sent, so the daemon's defaults apply.
"""

import json


def _print(value):
    if isinstance(value, (dict, list)):
        print(json.dumps(value, indent=2))
    elif value is not None:
        print(value)


def spdk_rpc_plugin_initialize(subparsers):
    def pool_create(args):
        _print(args.client.bdev_thin_pool_create(
            name=args.name, data_bdev=args.data_bdev, metadata_bdev=args.metadata_bdev,
            data_block_size=args.data_block_size, low_water_mark=args.low_water_mark,
            zero_new_blocks=args.zero_new_blocks, discard_passdown=args.discard_passdown,
            error_if_no_space=args.error_if_no_space,
            commit_interval_ms=args.commit_interval_ms))

    p = subparsers.add_parser(
        'bdev_thin_pool_create',
        help='Create a thin pool on a data bdev and a metadata bdev: formats a blank metadata '
             'bdev (first block zero), opens an existing pool otherwise')
    p.add_argument('-n', '--name', required=True, help='pool name')
    p.add_argument('-d', '--data-bdev', dest='data_bdev', required=True, help='data bdev name')
    p.add_argument('-m', '--metadata-bdev', dest='metadata_bdev', required=True,
                   help='metadata bdev name')
    p.add_argument('-b', '--data-block-size', dest='data_block_size', type=int,
                   help='data block size in bytes: 64 KiB to 1 GiB, a multiple of 64 KiB '
                        '(default 65536)')
    p.add_argument('-l', '--low-water-mark', dest='low_water_mark', type=int,
                   help='free data blocks at which a thin_pool_low_water_mark notification '
                        'is sent (default 0)')
    p.add_argument('--zero-new-blocks', dest='zero_new_blocks', action='store_true', default=None,
                   help='zero the rest of a new block on a partial first write (default)')
    p.add_argument('--no-zero-new-blocks', dest='zero_new_blocks', action='store_false')
    p.add_argument('--discard-passdown', dest='discard_passdown', action='store_true',
                   default=None, help='pass unmaps of freed blocks to the data bdev (default)')
    p.add_argument('--no-discard-passdown', dest='discard_passdown', action='store_false')
    p.add_argument('--error-if-no-space', dest='error_if_no_space', action='store_true',
                   default=None,
                   help='fail writes needing space at once with ENOSPC (default: wait up to '
                        '60 s for the pool to grow)')
    p.add_argument('-c', '--commit-interval-ms', dest='commit_interval_ms', type=int,
                   help='metadata commit period in ms (default 1000)')
    p.set_defaults(func=pool_create)

    def pool_delete(args):
        _print(args.client.bdev_thin_pool_delete(name=args.name))

    p = subparsers.add_parser('bdev_thin_pool_delete',
                              help='Commit and close a pool (its metadata stays on disk)')
    p.add_argument('name', help='pool name')
    p.set_defaults(func=pool_delete)

    def pool_get(args):
        _print(args.client.bdev_thin_pool_get_pools(name=args.name))

    p = subparsers.add_parser('bdev_thin_pool_get_pools',
                              help='Show pools: usage, mode, transaction id, thin bdevs')
    p.add_argument('-n', '--name', help='only this pool')
    p.set_defaults(func=pool_get)

    def pool_grow(args):
        _print(args.client.bdev_thin_pool_grow(name=args.name))

    p = subparsers.add_parser('bdev_thin_pool_grow',
                              help='Pick up a grown data bdev (after bdev_uring_rescan)')
    p.add_argument('name', help='pool name')
    p.set_defaults(func=pool_grow)

    def pool_set_tid(args):
        _print(args.client.bdev_thin_pool_set_transaction_id(
            name=args.name, old_id=args.old_id, new_id=args.new_id))

    p = subparsers.add_parser('bdev_thin_pool_set_transaction_id',
                              help='Compare-and-swap the pool transaction id')
    p.add_argument('name', help='pool name')
    p.add_argument('old_id', type=int, help='current transaction id')
    p.add_argument('new_id', type=int, help='new transaction id')
    p.set_defaults(func=pool_set_tid)

    def reserve_snap(args):
        _print(args.client.bdev_thin_pool_reserve_metadata_snap(name=args.name))

    p = subparsers.add_parser('bdev_thin_pool_reserve_metadata_snap',
                              help='Hold a metadata snapshot (for thin_dump -m on a live pool)')
    p.add_argument('name', help='pool name')
    p.set_defaults(func=reserve_snap)

    def release_snap(args):
        _print(args.client.bdev_thin_pool_release_metadata_snap(name=args.name))

    p = subparsers.add_parser('bdev_thin_pool_release_metadata_snap',
                              help='Release the held metadata snapshot')
    p.add_argument('name', help='pool name')
    p.set_defaults(func=release_snap)

    def thin_create(args):
        _print(args.client.bdev_thin_create(pool=args.pool, name=args.name,
                                            size_in_mib=args.size_in_mib, thin_id=args.thin_id))

    p = subparsers.add_parser('bdev_thin_create', help='Create a thin bdev in a pool')
    p.add_argument('-p', '--pool', required=True, help='pool name')
    p.add_argument('-n', '--name', required=True, help='thin bdev name')
    p.add_argument('-s', '--size-in-mib', dest='size_in_mib', type=int, required=True,
                   help='size in MiB')
    p.add_argument('-i', '--thin-id', dest='thin_id', type=int,
                   help='dm-thin device id (default: the lowest free one)')
    p.set_defaults(func=thin_create)

    def thin_snapshot(args):
        _print(args.client.bdev_thin_snapshot(thin_name=args.thin_name,
                                              snapshot_name=args.snapshot_name))

    p = subparsers.add_parser('bdev_thin_snapshot',
                              help='Snapshot a thin bdev (shares its blocks; no data copied)')
    p.add_argument('thin_name', help='thin bdev to snapshot')
    p.add_argument('snapshot_name', help='name of the new snapshot bdev')
    p.set_defaults(func=thin_snapshot)

    def thin_resize(args):
        _print(args.client.bdev_thin_resize(name=args.name, size_in_mib=args.size_in_mib))

    p = subparsers.add_parser('bdev_thin_resize',
                              help='Resize a thin bdev (shrinking unmaps what lies past the end)')
    p.add_argument('name', help='thin bdev name')
    p.add_argument('size_in_mib', type=int, help='new size in MiB')
    p.set_defaults(func=thin_resize)

    def thin_delete(args):
        _print(args.client.bdev_thin_delete(name=args.name))

    p = subparsers.add_parser('bdev_thin_delete',
                              help='Delete a thin bdev (frees blocks no one else maps)')
    p.add_argument('name', help='thin bdev name')
    p.set_defaults(func=thin_delete)
