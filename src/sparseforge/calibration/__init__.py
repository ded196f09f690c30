"""What every calibration-driven method shares: calibration windows (``data``), block inputs and running one block
over them (``block_inputs``), input statistics gathered by hooks (``statistics``), and per-block checkpoints that
are verified on resume (``checkpoint``). Content digests live in :mod:`sparseforge.export.integrity`."""
