"""Every ``maskdiff`` command, the top layer: nothing else in maskdiff imports from here.

:mod:`~maskdiff.tools.main` is the console entry (``maskdiff``, ``python -m maskdiff.tools``); each command is a
module: :mod:`~maskdiff.tools.lightning_cli` (fit, validate, test, predict), :mod:`~maskdiff.tools.sample`,
:mod:`~maskdiff.tools.evaluate`, :mod:`~maskdiff.tools.inpaint`, :mod:`~maskdiff.tools.probe`,
:mod:`~maskdiff.tools.convert`, :mod:`~maskdiff.tools.shards` and :mod:`~maskdiff.tools.preflight`;
:mod:`~maskdiff.tools.sampling` chooses the sampler and guidance for all of them;
:mod:`~maskdiff.tools.checkpoint_config` checks that a ``--ckpt_path`` holds the model the config builds.
"""
