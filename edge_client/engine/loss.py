"""Loss and accuracy of tokenized examples: lives in `shared.loss`.

Moved to shared/ so the coordinator evaluates its values with the device's exact loss; this module
keeps the engine's import path.
"""

from shared.loss import *  # noqa: F403
from shared.loss import __all__ as __all__
