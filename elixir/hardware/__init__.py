"""What a machine can do, as the planner's cost model needs it: memory sizes and measured rates.

A `Hardware` is a frozen record of one rank's view of a machine: the device memory it may fill, its
share of host memory, and the rates that decide a training step's time (matmul FLOP/s per dtype,
host<->device copy bandwidth, collective bus bandwidth per world size, AdamW update rate on device and
on host, device-internal copy bandwidth). `Hardware.preset(name)` gives figures for machines one does not
have (datasheet peaks times the fraction large kernels achieve in practice, with sources); `Hardware.measure()`
calibrates the machine at hand in a few seconds and caches the result.

On a CPU-only machine "device" and "host" are the same RAM (docs/architecture.md, "CPU-only machines"):
the device rates are measured on buffers kept apart from the host ones, as the runtime keeps them, and
each side gets half the RAM so that a plan filling both still fits.

Where each part lives:

- record.py: the `Hardware` record (its fields and checks, the lookups of the cost model, copies with
  other memory, disk or network, its JSON form) and `parse_bytes`;
- presets.py: the presets and the links between nodes (`INTER_NODE_LINKS`, `parse_link`);
- measure.py: `Hardware.measure()`'s calibration and `measure_disk`;
- cache.py: where the calibration caches live (`cache_dir`) and reading and writing them;
- machine.py: which device and how many ranks of the job this machine has, and how many nodes the job spans.
"""

from elixir.hardware.cache import cache_dir
from elixir.hardware.measure import measure_disk
from elixir.hardware.presets import INTER_NODE_LINKS, parse_link
from elixir.hardware.record import Hardware, parse_bytes

__all__ = ["INTER_NODE_LINKS", "Hardware", "cache_dir", "measure_disk", "parse_bytes", "parse_link"]
