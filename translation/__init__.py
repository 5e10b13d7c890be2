"""The translation stage (issue 3): English captions -> ES/ID/RU/TR with M2M-100, resumable and scored.

One file, one job:
- ``m2m``: a local M2M-100 directory (published layout): check, load (language-token trap handled), ids;
- ``engines/``: ``base`` (interface, tokenisation, token-budget batching, OOM split), ``ctranslate2_engine``
  (default, cached conversion), ``transformers_engine`` (reference);
- ``collect``: unique English texts of acquired sources;
- ``scores``: per-row quality scores and the ``ok`` flag (thresholds: ``spec.Thresholds``);
- ``store``: ``translations/<model-id>/<decode-id>/<lang>/part-NNNNN.parquet`` and ``load_translations``;
- ``pipeline``: plan missing parts, translate one part, the per-device engine pool;
- ``imports``: existing translations (CCLM/UC2 JSON lines, parquet) as ``import:<name>`` rows;
- ``train_demo_model``: reproduces ``demo_model/``, the committed demo translator.
"""
