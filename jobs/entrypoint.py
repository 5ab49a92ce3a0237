"""Ray job entrypoint: the `ralm` CLI, run from the job's working dir (the uploaded checkout).

    ray job submit --address http://HOST:8265 --runtime-env jobs/runtime_env.yaml --working-dir . \
        -- python jobs/entrypoint.py run --config configs/demo.yaml
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ralm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
