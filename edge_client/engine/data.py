"""Client data (task config, JSONL rows -> examples, the resumable stream): lives in `shared.dataset`.

Moved to shared/ so the coordinator's own evaluation (`[coordinator] eval_data`) and `meerkat evaluate`
read data exactly as a device does; this module keeps the engine's import path.
"""

from shared.dataset import *  # noqa: F403
from shared.dataset import __all__ as __all__
