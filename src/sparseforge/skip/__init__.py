"""Input-adaptive FFN skipping while decoding (FFN-SkipLLM): policies, their runtime, calibration, baselines."""

from .calibrate import calibrate_skip, matched_baseline
from .generation import generate
from .policy import POLICY_FILE, SkipPolicy, read_policy, save_policy
from .runtime import SkipController, install_policy, uninstall_policy

__all__ = ["POLICY_FILE", "SkipController", "SkipPolicy", "calibrate_skip", "generate", "install_policy",
           "matched_baseline", "read_policy", "save_policy", "uninstall_policy"]
