"""A compromised media worker, for tests: it starts like ``vision_server.media_worker`` and
then answers its first task the way its MODE says, never by decoding anything.

    python tests/support/rogue_media_worker.py MODE CONFIG_JSON
"""

from __future__ import annotations

import json
import os
import sys

from vision_server import media_protocol as wire


def main() -> None:
    mode, config = sys.argv[1], json.loads(sys.argv[2])
    result_fd = config["result_fd"]
    size = config["layout"]["tile_size"]

    def send(message: wire.Message) -> None:
        os.write(result_fd, wire.encode_message(message))

    def one_tile_plan(task_id: int) -> wire.Plan:
        # A tile-sized image is one tile, no thumbnail, whatever the options: a valid plan.
        return wire.Plan(task_id, size, size, 1, 1, False, size)

    send(wire.Ready(os.getpid(), 0))
    while (task := wire.read_task(config["task_fd"])) is not None:
        task_id = task.task_id
        if mode == "bad-grid":  # a grid the image's size does not give
            send(wire.Plan(task_id, size, size, 4, 4, True, size))
        elif mode == "tiles-out-of-range":
            send(one_tile_plan(task_id))
            send(wire.Tiles(task_id, 0, 5, wire.DTYPE_UINT8, 3, size, size))
        elif mode == "wrong-shape":
            send(one_tile_plan(task_id))
            send(wire.Tiles(task_id, 0, 1, wire.DTYPE_UINT8, 3, size * 2, size))
        elif mode == "done-early":
            send(one_tile_plan(task_id))
            send(wire.Done(task_id, 1))
        elif mode == "other-task":
            send(one_tile_plan(task_id + 1))
        elif mode == "garbage":
            os.write(result_fd, os.urandom(4096))
        elif mode == "huge-text":  # a Failed record claiming a gigabyte of text
            record = bytearray(wire.encode_message(wire.Failed(task_id, "x")))
            record[12:16] = (1 << 30).to_bytes(4, "little")
            os.write(result_fd, bytes(record[:-1]))
        elif mode == "silent":
            pass
        elif mode == "shrink-block":  # the server's mapping would fault on pages cut off
            try:
                os.ftruncate(config["block_fd"], 0)
                sys.stderr.write("rogue: the block was shrunk\n")
            except OSError as exc:
                sys.stderr.write(f"rogue: the block cannot be shrunk: {exc}\n")
            send(one_tile_plan(task_id))
            send(wire.Tiles(task_id, 0, 1, wire.DTYPE_UINT8, 3, size, size))
            send(wire.Done(task_id, 1))
        else:
            raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
