"""Surveys: all-pairs geometry over hundreds of adapters, out of core, module by module.

A survey of ``N`` adapters computes, for every common module (one ``(stack, layer, kind)``) and every
pair ``i < j``, every distance of :mod:`geometry.analysis.distances` (L2, cosine and Grassmann on ``ba``, ``a``
and ``b``). The factors of 500 Llama-3-8B r = 16 adapters are about 80 GB in float32, so nothing
holds them all:

* **Reading** (:func:`scan`): each adapter is indexed from its ``adapter_config.json`` and the
  safetensors *header* only (module keys, shapes, scales: the loader's own mapping,
  :func:`geometry.io.loader.fill_modules`, run on zero-stride placeholders). A module task then reads that
  module's two factors of each adapter with safetensors' lazy ``safe_open`` (a slice for the rows
  of a fused projection), or with byte-range reads through ``fsspec`` for a URL (``s3://``,
  ``gs://``, ``file://``...).
* **Computing** (:func:`compute_module`): per module, the factored engine of :mod:`geometry.linalg.gram`
  (one Gram product over all adapters' stacked factors, then ``r x r`` algebra per pair) and the
  metric definitions of :mod:`geometry.analysis.distances`, i.e. the same code as ``geometry.distances``,
  on one layer. When ``N r`` is large the adapters are split into blocks and the Gram product is
  formed per block pair ``(I, J)`` (``I <= J``: the pairs inside ``I`` when ``I = J``, across
  otherwise); pairs are processed in chunks. Block and chunk sizes follow from the memory limit
  (:func:`plan_blocks`), so the working memory is bounded whatever ``N``. Blocking changes only
  rounding (a layer is promoted to float64 Householder coordinates when one of its pairs in the
  block needs it, :mod:`geometry.linalg.gram`): blocked and unblocked results agree to ``~1e-12``.
* **Writing** (:func:`run_survey`): the output is a Parquet dataset (a folder ``results.parquet/``):
  one file per finished module, written atomically (temporary name, then rename), one row per
  ``(i, j, module)`` with ``i < j`` (distances are symmetric) and one float64 column per
  ``metric_factor`` (``l2_ba`` ... ``grassmann_b``); NaN where undefined (a zero task vector, A or
  B alone at different ranks), never 0. ``_survey.json`` beside them describes the adapters and the
  settings. A rerun skips the modules already written (resume after an interruption); it refuses
  a folder written for other adapters or settings.
* **Distributed**: :mod:`geometry.survey.cluster` runs the same module tasks on a Dask cluster.

Modules: :mod:`~geometry.survey.index` (reading headers and factors), :mod:`~geometry.survey.compute`
(one module task and its memory plan), :mod:`~geometry.survey.run` (planning, writing, resuming),
:mod:`~geometry.survey.results` (reading results), :mod:`~geometry.survey.format` (the on-disk format),
:mod:`~geometry.survey.cluster` (Dask).

Reading results: :func:`open_survey` (a folder, or one Parquet file written by :meth:`Survey.save`),
:meth:`Survey.matrix` (adapter x adapter mean over modules), :meth:`Survey.neighbours`.
"""


from geometry.survey.compute import (
    ModuleTask,
    SurveySettings,
    compute_module,
    condensed_pairs,
    module_distances,
    plan_blocks,
    task_bytes,
)
from geometry.survey.format import (
    BASELINE_BYTES,
    DEFAULT_MEMORY_GB,
    FORMAT_VERSION,
    KEY_COLUMNS,
    MANIFEST,
    METRIC_COLUMNS,
    finished_modules,
)
from geometry.survey.index import (
    AdapterRef,
    FactorRef,
    adapter_locations,
    index_adapter,
    read_factors,
    read_header,
    scan,
)
from geometry.survey.results import (
    Survey,
    cluster_order,
    factors_gb,
    filter_adapters,
    nearest,
    open_survey,
    survey_bytes_to_file,
)
from geometry.survey.run import (
    local_runner,
    manifest,
    memory_runner,
    module_table,
    plan,
    refs_from_adapters,
    run_survey,
)

__all__ = [
    "BASELINE_BYTES", "DEFAULT_MEMORY_GB", "FORMAT_VERSION", "KEY_COLUMNS", "MANIFEST", "METRIC_COLUMNS",
    "AdapterRef", "FactorRef", "cluster_order", "filter_adapters", "nearest", "ModuleTask", "Survey", "SurveySettings", "adapter_locations", "compute_module",
    "condensed_pairs", "factors_gb", "finished_modules", "index_adapter", "local_runner", "manifest",
    "memory_runner", "module_distances", "module_table", "open_survey", "plan", "plan_blocks", "read_factors",
    "read_header", "refs_from_adapters", "run_survey", "scan", "survey_bytes_to_file", "task_bytes",
]
