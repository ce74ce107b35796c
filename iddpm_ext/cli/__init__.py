"""The ``iddpm`` command (:mod:`.app`; also ``python -m iddpm_ext``): its flags and presets
(:mod:`.flags`, :mod:`.presets`), the work behind train / sample / nll / fid
(:mod:`.commands`), sample generation with per-sample seeds (:mod:`.generate`) and the sample
files (:mod:`.images`), the digits demo (:mod:`.demo`), the 2-D toy run (:mod:`.toy`) and the
small-scale reproduction (:mod:`.reproduce`)."""

from .app import main  # noqa: F401
