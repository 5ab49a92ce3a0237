"""Ray job entrypoint: the `ralm` CLI, run from the job's working dir (the uploaded checkout).

    ray job submit --address http://HOST:8265 --runtime-env jobs/runtime_env.yaml --working-dir . \
        -- python jobs/entrypoint.py run --config configs/demo.yaml
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    try:
        import ray  # noqa: F401  (the stack every command needs, imported up front to fail here)

        import ralm.pipeline  # noqa: F401
        from ralm.cli import main
    except ImportError as e:  # the job's `python` is the cluster's: say which one lacks the stack, and why
        sys.exit(f"ralm job: {sys.executable} cannot import ralm's dependencies ({e}). The job runs the "
                 "cluster's `python`: start the cluster from the set-up environment (`source .venv/bin/activate` "
                 "before `ray start`), or use an image with the stack installed (cluster/Dockerfile).")
    sys.exit(main())
