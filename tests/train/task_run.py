"""``python task_run.py CHECKPOINT DATA OUT FLAGS_JSON [--kill-at N]``: gfgp_cli.train.train of a
converted checkpoint (any task), in a process of its own; with --kill-at the process SIGKILLs
itself in its N-th training forward (a forward hook on the model: the state_dict is unchanged).
Prints the result as JSON."""

from __future__ import annotations

import json
import os
import signal
import sys

if __name__ == "__main__":
    from gfgp_cli import load
    from gfgp_cli.spec import spec_of
    from gfgp_cli.train import train

    checkpoint, data, out, flags, rest = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5:]
    model = load(checkpoint)
    if "--kill-at" in rest:
        at, calls = int(rest[rest.index("--kill-at") + 1]), []

        def kill(module, args, output):
            if module is model and module.training:  # not the memory check's copy
                calls.append(1)
                if len(calls) >= at:
                    os.kill(os.getpid(), signal.SIGKILL)

        model.register_forward_hook(kill)
    result = train(checkpoint, data, out, model=model, spec=spec_of(model), **flags)
    print(json.dumps({"epochs": result.epochs, "interrupted": result.interrupted, "final": result.final}))
