"""A stand-in for a rank of `hetnet train --gpus N`, started by hetnet.parallel.launch in tests/test_parallel.py: it
joins the launcher's watchdog, takes a value from the rendezvous store as the NCCL id is taken, makes STEPS units of
progress and says goodbye -- or fails as argv[1] says: "error" (rank 1 reports an error), or HETNET_TEST_FAULT in
the environment (die / hang, see hetnet.parallel.watchdog). A rank that has finished its steps waits, as a rank
does in the collective a failed rank never reaches."""
from __future__ import annotations

import os
import sys
import time

from hetnet.parallel.watchdog import Heartbeat, store_get, store_set

STEPS = 20


def main() -> int:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    addr = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    hb = Heartbeat(addr, rank, world, reporter=0, lost_message="the launcher went away")
    if rank == 0:
        store_set(addr, "nccl_id", ["tuple", [1, 2, 3]])
    elif store_get(addr, "nccl_id") != ["tuple", [1, 2, 3]]:
        hb.error("wrong rendezvous value", 1)
    for _ in range(STEPS):
        hb.step()
        time.sleep(0.02)
    if sys.argv[1:] == ["error"] and rank == 1:
        hb.error("the data went missing", 2)
    if os.environ.get("HETNET_TEST_FAULT"):
        with hb.waiting():
            time.sleep(600)
    hb.bye()
    hb.close()
    print(f"rank {rank} done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
