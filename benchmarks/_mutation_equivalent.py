"""The surviving mutants of `mutation_report` that no test can kill, each with the reason:
equivalent to the original, or told apart only on a GPU, which the tests do not use."""

from __future__ import annotations

from collections.abc import Mapping

_STRICT_ZIP = "the two sequences always have the same length, so `strict` never fires"
_RUNNER = "qatkd.export.codes.x_code_runner__mutmut_"
_EVEN = "an integer code times 2^(k + 1) is even, never -129 or 127: the bound moves nothing"
_ANY_NEGATIVE = "numpy takes any negative size as the one unknown dimension: -2 reshapes as -1 does"
_RUNNER_ZIP = "for hint, value in zip(outputs, values, "
_THREADS = (
    "onnxruntime splits a kernel's work over threads by output rows, never inside a sum, so the "
    "codes are the same on 1 or 2 threads; only the speed differs"
)
_WEIGHTS = "qatkd.balance.balancers.xǁGoRǁweights__mutmut_"
_WEIGHTS_ZIP = "return dict(zip(self.weight_names, weights.tolist(), "
_MEASURED = "qatkd.balance.balancers.xǁGoRǁmeasured__mutmut_"
_MEASURED_ZIP = "return dict(zip(names, self.alignment.tolist(), "
_READ = "qatkd.distill.cache.xǁTeacherLogitCacheǁ_read__mutmut_"
_ON_CPU = (
    "the cache only writes CPU tensors (`rows` moves them before `_write`), so they load onto "
    "the CPU without `map_location`"
)
_WEIGHTS_ONLY = (
    "torch >= 2.6 (the project pins 2.14.1) loads with weights_only=True unless told otherwise; "
    "weights_only=False is killed by test_a_file_that_needs_arbitrary_unpickling_is_refused"
)
_ROWS = "qatkd.distill.cache.xǁTeacherLogitCacheǁrows__mutmut_"
_ENGINE = "qatkd.train.engine.x_"
_FIT = f"{_ENGINE}fit__mutmut_"
_CUDA_RNG = (
    "not equivalent on a GPU: the CUDA generator's state is saved and restored only where the "
    "run trains on CUDA; on a CPU-only machine that branch never runs (no GPU test here)"
)
_RNG_STATES = {
    5: 'if device.type == "XXcudaXX":',
    6: 'if device.type == "CUDA":',
    7: 'states["cuda"] = None',
    8: 'states["XXcudaXX"] = torch.cuda.get_rng_state(device)',
    9: 'states["CUDA"] = torch.cuda.get_rng_state(device)',
    10: 'states["cuda"] = torch.cuda.get_rng_state(None)',
}
_SET_RNG_STATES = {
    4: 'if "cuda" in states or device.type == "cuda":',
    5: 'if "XXcudaXX" in states and device.type == "cuda":',
    6: 'if "CUDA" in states and device.type == "cuda":',
    7: 'if "cuda" not in states and device.type == "cuda":',
    8: 'if "cuda" in states and device.type != "cuda":',
    9: 'if "cuda" in states and device.type == "XXcudaXX":',
    10: 'if "cuda" in states and device.type == "CUDA":',
    11: "torch.cuda.set_rng_state(None, device)",
    12: 'torch.cuda.set_rng_state(states["cuda"], None)',
    13: "torch.cuda.set_rng_state(device)",
    14: 'torch.cuda.set_rng_state(states["cuda"], )',
    15: 'torch.cuda.set_rng_state(states["XXcudaXX"], device)',
    16: 'torch.cuda.set_rng_state(states["CUDA"], device)',
}
_SCALER = (
    "not equivalent on a GPU: loss scaling is on only for float16 on CUDA (`precision.scaled`); "
    "on the CPU the scaler is off whatever the device or flag it is given"
)
_SCALER_STATE = (
    "not equivalent on a GPU: a scaler that is off (always, on the CPU) saves an empty state, "
    "which a resume never loads"
)
_SIGN = "  # best is tracked as sign * main_metric"
_ORDER = "a positive factor keeps the order of the scores, so the same epoch is the best"
_TO_DEVICE = (
    "not equivalent on a GPU: `.to(None)` leaves a CPU module where it is, and the tests train "
    "on the CPU"
)
_DDP_DEVICE = (
    "not equivalent on a GPU: a CPU module takes no device ids in DistributedDataParallel, and "
    "every mutant gives it none on the CPU (the two-process tests run on the CPU, with gloo); on "
    "CUDA the ids name the rank's GPU"
)
_REFRESH = (
    "`refresh` only decides whether a terminal's bar redraws at once for a new postfix (the "
    "next redraw shows it anyway; None is as false as False): the lines the tests read, and "
    "what a terminal shows, do not change"
)
_SAME_RATE = (
    "groups 0 and 1 are the model's weights and its norms, biases and quantizer scales, always "
    "at the same rate on the same schedule (only the balancer's group has its own)"
)
_SCHEDULER_WARNING = (
    "the filter's message is matched case-insensitively (`warnings.filterwarnings` compiles it "
    "with re.I), and the block it guards calls only the schedule's step, whose one warning is "
    "this one: ignoring every warning there ignores the same (test_faults.py asserts none shows)"
)
_UNITS_ARE_SAMPLES = (
    "not equivalent for language models, whose unit is the token: an image model's units are "
    "its samples (classification and detection count images), and the trainer's tests train "
    "image models"
)
_SAME_WEIGHTS = (
    "every rank holds the same weights (DDP averages the student's gradients, the engine the "
    "balancer's and the KD parts'), so a rank that raises found the non-finite value itself: "
    "`name` is never empty where the message is written"
)
_TO_CPU = (
    "not equivalent on a GPU: a teacher on CUDA returns CUDA logits, which the CPU table cannot "
    "take without `.to('cpu')`; on a CPU-only machine nothing can tell (no GPU test here)"
)
_CHECK = "qatkd.distill.ensemble.xǁTeacherEnsembleǁcheck_num_classes__mutmut_"
_CHECK_ZIP = "for label, logits in zip(self.labels, self(example), "
_HOOKS = "qatkd.distill.ensemble.xǁTeacherEnsembleǁ__init____mutmut_"
_HOOKS_ZIP = "for teacher, label in zip(self.teachers, self.labels, "
_WITH_FEATURES = "qatkd.distill.ensemble.xǁTeacherEnsembleǁwith_features__mutmut_"
_WITH_FEATURES_ZIP = "for t, named in zip(logits, features, "
_KEEPERS = "qatkd.distill.features.xǁFeatureHooksǁ__init____mutmut_"
_KEEPERS_ZIP = "for name, module in zip(names, modules, "
_REVERSE = "qatkd.distill.losses.x_kd_reverse_kl__mutmut_"
_LAST_DIM = "`_rows` makes the logits 2-D, so dimension 1 is the last one"
_BASE = "qatkd.quant.base.xǁQuantizerǁ"
_DIST = "qatkd.train.distributed.x_"
_HELD = "qatkd.train.held_out.xǁHeldOutPassǁ"
_STEPS = "qatkd.train.step.x_time_steps__mutmut_"
_PARTS = "qatkd.train.step.x_make_kd_parts__mutmut_"
_SOURCE_0 = "broadcast_object_list takes rank 0 as the source where none is given"
_ISLAND = "qatkd.export.onnx_fallback.x_island_graph__mutmut_"
_CODE_OF = "qatkd.export.onnx_graph.x_code_of__mutmut_"
_BOUNDS = (
    "the bounds `code_of` is given are those of a ReLU (0, +inf), a Clip (finite) and a "
    "hardsigmoid (0, 1): -inf never, and an infinity is never 0 or between 0 and 1"
)
_ONE_CALLER = (
    "its one caller (`_quantize`) bounds the code again: at least a low bound that is at "
    "least qmin, at most a high bound that is at most qmax"
)
_GRAPH = "qatkd.export.onnx_graph.xǁGraphBuilderǁ"
_QUANTIZE = f"{_GRAPH}_quantize__mutmut_"
_OFFSET_RANGE = (
    "`dequantize` reads only the scale of the hardsigmoid's offset range and its sign (qmin < 0, "
    "false for 0 and 1 alike): its other fields are never read"
)
_WIDE_RANGE = (
    "the shifted hardsigmoid's codes take the bounds they are given and the zero point of the "
    "original range: `wide` lends only its scale (no DequantizeLinear of the Add's output "
    "compares ranges with it)"
)
_ISLAND_ZIP = "for name, n in [*zip(in_names, inputs, {}), *zip(out_names, outputs, {})]"
_NCCL = (
    "not equivalent on a GPU: nccl reduces CUDA tensors only, and the tensor stays on the CPU; "
    "gloo (the tests' two processes) reduces CPU ones"
)
_BATCH_TO_CPU = (
    "not equivalent on a GPU: `to_device(batch, None)` leaves the batch on the CPU, where the "
    "tests train anyway"
)
_CPU_AUTOCAST = (
    "not equivalent on a GPU: the CPU's autocast dtype is bfloat16 by default, the only one "
    "`mixed_precision` gives a CPU (CUDA's default is float16)"
)
_CUDA_ONLY = "not equivalent on a GPU: the clock waits for CUDA's queued kernels there only"
_CPU_SCALER = (
    "not equivalent on a GPU: on the CPU the scaler is always off (`mixed_precision`), and the "
    "fake-clock tests time nothing that a scaler's own work would change"
)
_ONE_PROCESS = (
    "the timed step runs in one process (`World()`): `optimizer_step` hands the balancer and "
    "the KD parts only to `average_gradients`, which does nothing there"
)
_ANY_ORDER = (
    "which samples form each timed batch does not change what a step costs (the fake-clock "
    "tests read the time, never the batches)"
)
_OPS = "qatkd.export.onnx_ops.x_"
_PLOT = "qatkd.train.plots.x_plot_run__mutmut_"
_PLOT_ZIP = "ax.plot(*zip(*pts, "
_FLATTEN_AXIS = (
    "ONNX's Flatten takes axis 1 where none is given, and `helper.make_node` leaves a None "
    "attribute out: the same node"
)
_INT64 = (
    "numpy 2 makes an array of Python ints int64 on every platform, the dtype the original names"
)
_NAME = (
    "only the name of an initializer or a node's output changes (`GraphBuilder.name` keeps each "
    "unique); no op reads a name, and the activation codes are keyed by tensor hints instead"
)
_WIDTHS_ON_CPU = (
    "not equivalent on a GPU: repeat_interleave selects with its repeats as indices, and CUDA's "
    "index_select refuses CPU ones; on a CPU-only machine nothing can tell (no GPU test here)"
)
_CONV = "qatkd.quant.modules.xǁQuantConv2dǁfrom_float__mutmut_"
_CONV_ARGS = "conv.dilation, conv.groups, "
_LINEAR = "qatkd.quant.modules.xǁQuantLinearǁfrom_float__mutmut_"
_LINEAR_NEW = "new = cls(linear.in_features, linear.out_features, "
_BIAS = (
    "`_adopt` then sets `bias` to the float layer's own (a Parameter or None), so the meta "
    "placeholder made or not first is never seen"
)
_SUMMARY = "qatkd.quant.prepare.x_quant_summary__mutmut_"
_SUMMARY_ZIP = '"  ".join(cell.ljust(width) for cell, width in zip(row, widths, '
_FLOAT_CODES = "qatkd.quant.quantizers.xǁFloatQuantizerǁ_codes__mutmut_"
_MINMAX_INIT = "qatkd.quant.quantizers.xǁMinMaxQuantizerǁ_init__mutmut_"
_GPTQ_CACHED = "qatkd.quant.gptq_cache.x_gptq_cached__mutmut_"
_GPTQ_KEY = "qatkd.quant.gptq_cache.x_gptq_key__mutmut_"
_GPTQ_SETTINGS = "qatkd.quant.gptq_cache.x__settings__mutmut_"
_GPTQ_READ = "qatkd.quant.gptq_cache.x__read__mutmut_"
_HESSIANS = "qatkd.quant.gptq.x__hessians__mutmut_"
_CALL_MODULE = "qatkd.quant.tensors.xǁLeafTracerǁcall_module__mutmut_"
_CALL_NAME = "qatkd.quant.tensors.x_call_name__mutmut_"
_CALL_NAME_LINE = 'if node.op == "call_function" and getattr(target, "__module__", '
_HAS_MODULE = (
    "every function fx records as a call_function target (Python functions, builtins, "
    "operator's and torch's C functions) has a `__module__`, so the default is never read"
)
_HOOK_ARGUMENT = (
    "a site's hook takes the arguments torch passes to a hook, and reads only the tensor it "
    "quantizes (the first input, or the output), never the module or the other arguments"
)
_LABEL = (
    "the names only label the values of a document that is hashed and never read back: any "
    "names that differ from each other serve"
)
_DUMPS = "digest.update(json.dumps(settings, "
_ORDERED = (
    "the document is built in the same order on every call (the modules in named_modules' "
    "order, each one's attributes in the order its class sets them), so it hashes alike unsorted"
)
_PLAIN_JSON = (
    "every value `_settings` keeps is a plain bool, int, float, str, None, list or tuple of "
    "those, which JSON writes without `default`"
)
_LOAD = "stored = torch.load(path, "
_HESSIAN_ZEROS = "name: torch.zeros(m.in_features, m.in_features, "
_HESSIAN_ON_GPU = (
    "not equivalent on a GPU: the sums would be made on the CPU while the inputs are on the "
    "GPU; on a CPU-only machine every tensor is on the CPU (no GPU test here)"
)
_ONES = "return x, torch.ones((), "
_UNREAD = (
    "the scale `_codes` returns at 16 bits is never read: FloatQuantizer's forward returns its "
    "input, and quantize_int keeps the codes only"
)


def _alike(
    mutants: str,
    reason: str,
    parts: Mapping[int, str | tuple[str, ...]],
    line: str = "{}",
) -> dict[str, tuple[str, str]]:
    """The mutants of one function that one reason explains: `parts` maps each mutant's number
    to what it writes in place of each `{}` of `line` (by default, the whole line)."""
    notes: dict[str, tuple[str, str]] = {}
    for n, part in parts.items():
        pieces = line.split("{}")
        values = (part,) if isinstance(part, str) else part
        if len(values) != len(pieces) - 1:
            raise ValueError(f"{mutants}{n}: {len(values)} parts for {len(pieces) - 1} places")
        filled = pieces[0] + "".join(v + rest for v, rest in zip(values, pieces[1:], strict=True))
        notes[f"{mutants}{n}"] = (filled, reason)
    return notes


def _strict_zip(
    mutants: str, numbers: tuple[int, int, int], call: str, close: str
) -> dict[str, tuple[str, str]]:
    """The three mutants of one `zip(..., strict=True)` (strict=None, dropped, False), numbered
    `numbers`: `call` is the line up to the strict argument, `close` what follows it."""
    arguments = ("strict=None", "", "strict=False")
    return _alike(
        mutants, _STRICT_ZIP, dict(zip(numbers, arguments, strict=True)), call + "{}" + close
    )


_NEWLINE = (
    "on POSIX, newline=None writes the csv module's \\r\\n as it is, as newline='' does (only "
    "Windows would turn its \\n into \\r\\n)"
)
_NEWLINE_READ = (
    "reading, newline=None turns the \\r\\n that ends each row into \\n, which the csv reader "
    "splits alike (no cell holds a line break)"
)


EQUIVALENT: dict[str, tuple[str, str]] = {
    "qatkd.balance.balancers.xǁGoRǁobserve__mutmut_2": (
        "super().observe(None)",
        "`LossBalancer.observe` raises its TypeError without reading the alignments it is handed",
    ),
    **_strict_zip(_WEIGHTS, (29, 32, 33), _WEIGHTS_ZIP, "))"),
    **_strict_zip(_MEASURED, (7, 10, 11), _MEASURED_ZIP, "))"),
    "qatkd.balance.diagnostics.x_dot__mutmut_18": (
        "total = total.to(None) + (x.double() * y.double()).sum()",
        "not equivalent with the parameters split over two GPUs, where a 0-d tensor on one does "
        "not add to one on the other; the 0-d CPU zero adds to a tensor on any one device (the "
        "sum lands there), so on a CPU or one GPU nothing can tell (no multi-GPU test here)",
    ),
    f"{_READ}4": ("stored = torch.load(self.path, map_location=None, weights_only=True)", _ON_CPU),
    f"{_READ}7": ("stored = torch.load(self.path, weights_only=True)", _ON_CPU),
    f"{_READ}5": (
        'stored = torch.load(self.path, map_location="cpu", weights_only=None)',
        _WEIGHTS_ONLY,
    ),
    f"{_READ}8": ('stored = torch.load(self.path, map_location="cpu", )', _WEIGHTS_ONLY),
    f"{_READ}24": ("ok = None  # not a torch file, or a truncated one", "None is false too"),
    f"{_READ}26": ("ok = None  # a torch file of another layout", "None is false too"),
    f"{_ROWS}27": ("computed = compute_fn(missing).detach().to(None, self.dtype)", _TO_CPU),
    f"{_ROWS}29": ("computed = compute_fn(missing).detach().to(self.dtype)", _TO_CPU),
    "qatkd.distill.ensemble.xǁTeacherEnsembleǁtrain__mutmut_1": (
        "def train(self, mode: bool = False) -> TeacherEnsemble:",
        "`train` ignores its mode: the teachers stay in eval mode whatever it is",
    ),
    **_strict_zip(_CHECK, (3, 6, 8), _CHECK_ZIP, "):"),
    **_strict_zip(_HOOKS, (29, 32, 33), _HOOKS_ZIP, ")"),
    **_strict_zip(_WITH_FEATURES, (11, 14, 15), _WITH_FEATURES_ZIP, ")"),
    **_strict_zip(_KEEPERS, (14, 17, 18), _KEEPERS_ZIP, ")"),
    f"{_REVERSE}8": (
        "log_p_student = F.log_softmax(_rows(student_logits).float() / temperature, dim=+1)",
        _LAST_DIM,
    ),
    "qatkd.distill.losses.x_kd_kl__mutmut_8": (
        "log_p_student = F.log_softmax(_rows(student_logits).float() / temperature, dim=+1)",
        _LAST_DIM,
    ),
    f"{_REVERSE}18": (
        "kl = (log_p_student.exp() * (log_p_student - log_p_teacher)).sum(+1).mean()",
        _LAST_DIM,
    ),
    f"{_BASE}_reduce__mutmut_3": (
        "return op(x.reshape(-1), None)",
        "the flattened tensor is 1-D, so reducing dimension 0 is reducing every dimension (None)",
    ),
    f"{_BASE}__init____mutmut_44": (
        "self.group_widths: list[int] = None",
        "only a grouped quantizer reads `group_widths` (its numel_per_scale and `_broadcast`), and "
        "it always replaces the initial value; an ungrouped one only tests it for truth, and None "
        "is as false as []",
    ),
    f"{_BASE}__init____mutmut_64": (
        "else math.prod(weight_shape) / math.prod(self.param_shape)",
        "the division is exact (each scale covers whole rows of the weight), and the quotient "
        "only enters LSQ's gradient scale 1 / sqrt(N Q_p), the same for 27 and 27.0",
    ),
    f"{_BASE}__init____mutmut_67": (
        "else 1",
        "an activation quantizer never reads `numel_per_scale`: `_elements_per_scale` takes its N "
        "from the input",
    ),
    f"{_BASE}__init____mutmut_68": (
        "self.calibrating = None",
        "`calibrating` is only tested for truth (`training or calibrating`, `elif calibrating`) "
        "and `calibrate` sets it to True and back to False; None is as false as False",
    ),
    f"{_BASE}_broadcast__mutmut_4": (
        "widths = torch.tensor(self.group_widths, device=None)",
        _WIDTHS_ON_CPU,
    ),
    f"{_BASE}_broadcast__mutmut_6": ("widths = torch.tensor(self.group_widths, )", _WIDTHS_ON_CPU),
    f"{_CONV}9": (f'{_CONV_ARGS}None, conv.padding_mode, device="meta",', _BIAS),
    f"{_CONV}22": (f'{_CONV_ARGS}conv.bias is None, conv.padding_mode, device="meta",', _BIAS),
    f"{_LINEAR}4": (f'{_LINEAR_NEW}None, device="meta")', _BIAS),
    f"{_LINEAR}8": (f'{_LINEAR_NEW}device="meta")', _BIAS),
    f"{_LINEAR}10": (f'{_LINEAR_NEW}linear.bias is None, device="meta")', _BIAS),
    **_strict_zip(_SUMMARY, (38, 41, 42), _SUMMARY_ZIP, ")).rstrip()"),
    f"{_FLOAT_CODES}2": (f"{_ONES}dtype=None, device=x.device), None", _UNREAD),
    f"{_FLOAT_CODES}3": (f"{_ONES}dtype=x.dtype, device=None), None", _UNREAD),
    f"{_FLOAT_CODES}5": (f"{_ONES}device=x.device), None", _UNREAD),
    f"{_FLOAT_CODES}6": (f"{_ONES}dtype=x.dtype, ), None", _UNREAD),
    **_strict_zip(
        _MINMAX_INIT, (3, 6, 8), "for buffer, value in zip(self._bounds(), self._range(x), ", "):"
    ),
    f"{_GPTQ_CACHED}10": (
        'path = cache_dir / f"gptq-{key[:25]}.pt"',
        "the file's name only has to differ between keys: a hit also compares the whole key "
        "stored in the file",
    ),
    **_alike(
        _GPTQ_KEY,
        _LABEL,
        {
            8: '"XXmodulesXX": {name: _settings(m) for name, m in model.named_modules()},',
            9: '"MODULES": {name: _settings(m) for name, m in model.named_modules()},',
            11: '"XXstagesXX": [list(stage) for stage in stages],',
            12: '"STAGES": [list(stage) for stage in stages],',
            14: '"XXdampXX": DAMP,',
            15: '"DAMP": DAMP,',
            16: '"XXblockXX": BLOCK,',
            17: '"BLOCK": BLOCK,',
            18: '"XXversionsXX": {p: _version(p) for p in ("torch", "transformers")},',
            19: '"VERSIONS": {p: _version(p) for p in ("torch", "transformers")},',
        },
    ),
    f"{_GPTQ_SETTINGS}2": ('"XXclassXX": type(module).__qualname__,', _LABEL),
    f"{_GPTQ_SETTINGS}3": ('"CLASS": type(module).__qualname__,', _LABEL),
    f"{_GPTQ_KEY}27": (f"{_DUMPS}sort_keys=None, default=repr).encode())", _ORDERED),
    f"{_GPTQ_KEY}30": (f"{_DUMPS}default=repr).encode())", _ORDERED),
    f"{_GPTQ_KEY}32": (f"{_DUMPS}sort_keys=False, default=repr).encode())", _ORDERED),
    f"{_GPTQ_KEY}28": (f"{_DUMPS}sort_keys=True, default=None).encode())", _PLAIN_JSON),
    f"{_GPTQ_KEY}31": (f"{_DUMPS}sort_keys=True, ).encode())", _PLAIN_JSON),
    f"{_GPTQ_KEY}38": (
        "_update(digest, None, tensor)",
        "the state's names follow from the modules' names and classes, which the key holds, and "
        "each tensor is hashed in the state's order with its dtype and shape",
    ),
    f"{_GPTQ_KEY}45": (
        "_update(digest, None, batch)",
        "the batches are hashed in order, each with its dtype and shape: the index adds nothing",
    ),
    f"{_GPTQ_SETTINGS}10": (
        'if not k.startswith("XX_XX") and k != "training" and isinstance(v, plain)',
        "it adds the modules' private plain attributes (torch's hook flags) to the key: more in a "
        "key can only turn a hit into a miss, and for two models built alike they are the same",
    ),
    **_alike(
        _GPTQ_READ,
        "load_state_dict copies each stored tensor into the model's own, on the model's "
        "device, wherever it was loaded",
        {4: "map_location=None, weights_only=True", 7: "weights_only=True"},
        f"{_LOAD}{{}})",
    ),
    **_alike(
        _GPTQ_READ,
        "torch >= 2.6 (the project pins 2.14.1) loads with weights_only=True unless told "
        "otherwise; weights_only=False is killed by the `unpickling` case of "
        "test_a_file_that_cannot_be_used_is_computed_again_and_replaced",
        {5: 'map_location="cpu", weights_only=None', 8: 'map_location="cpu", '},
        f"{_LOAD}{{}})",
    ),
    **_alike(
        _CALL_NAME,
        _HAS_MODULE,
        {9: "None", 12: "", 15: '"XXXX"'},
        f'{_CALL_NAME_LINE}{{}}).startswith("torchvision"):',
    ),
    "qatkd.quant.placement.x__commutes__mutmut_10": (
        'module, "return_indices", None',
        "only tested for truth (`not getattr(...)`): None, for the modules without the attribute, "
        "is as false as False",
    ),
    f"{_CALL_MODULE}8": (
        "leaf = self.is_leaf_module(m, None)",
        "LeafTracer.is_leaf_module and fx's own decide by the module's class and never read the "
        "qualified name",
    ),
    f"{_CALL_MODULE}12": (
        "for site in sites.input_sites(m) if (leaf) or True else []:",
        "placement puts input sites only on modules that are call_module nodes of the trace, "
        "which are leaves: a module fx traces through has none",
    ),
    f"{_CALL_MODULE}15": ("args = site(None, args)", _HOOK_ARGUMENT),
    f"{_CALL_MODULE}32": ("out = site(None, args, out)", _HOOK_ARGUMENT),
    f"{_CALL_MODULE}33": ("out = site(m, None, out)", _HOOK_ARGUMENT),
    f"{_HESSIANS}5": (
        f"{_HESSIAN_ZEROS}dtype=torch.float64, device=None)",
        _HESSIAN_ON_GPU,
    ),
    f"{_HESSIANS}9": (f"{_HESSIAN_ZEROS}dtype=torch.float64, )", _HESSIAN_ON_GPU),
    f"{_GPTQ_CACHED}45": (
        'partial = path.with_suffix(".PARTIAL")',
        "the unfinished file's name is never read: it is renamed to the final name once written",
    ),
    "qatkd.quant.tensors.xǁLeafTracerǁis_leaf_module__mutmut_3": (
        "return isinstance(m, self.leaves) or super().is_leaf_module(m, None)",
        "fx's own is_leaf_module decides by the module's class and never reads the qualified name",
    ),
    "qatkd.quant.tensors.x_check_state_fits_shared_quantizers__mutmut_3": (
        "for name, module in model.named_modules(remove_duplicate=None):",
        "named_modules only tests `remove_duplicate` for truth, and None is false as False is",
    ),
    "qatkd.export.bias_grid.x_spare_bits__mutmut_15": (
        "while low * 2 ** (k + 1) >= -129 and high * 2 ** (k + 1) <= 127 and k < 7:",
        _EVEN,
    ),
    "qatkd.export.bias_grid.x_spare_bits__mutmut_21": (
        "while low * 2 ** (k + 1) >= -128 and high * 2 ** (k + 1) < 127 and k < 7:",
        _EVEN,
    ),
    "qatkd.export.bias_grid.x_int32_bias_fits__mutmut_8": (
        "magnitude = np.abs(weight_codes.astype(None)).reshape(len(weight_codes), -1).sum(1)",
        "float64 holds every sum of integer codes below 2^53 exactly, and its abs of -128 is 128 "
        "as int64's is: the same magnitudes, compared with the same bound",
    ),
    "qatkd.export.bias_grid.x_int32_bias_fits__mutmut_10": (
        "magnitude = np.abs(weight_codes.astype(np.int64)).reshape(len(weight_codes), -2).sum(1)",
        _ANY_NEGATIVE,
    ),
    "qatkd.export.codes.x_code_runner__mutmut_6": (
        "tensors = {OUTPUT_NAME: (OUTPUT_NAME, 1)} | activation_codes(proto)",
        "the output's zero point is never read: `run` returns the float logits as they are",
    ),
    "qatkd.export.codes.x_code_runner__mutmut_17": (
        "session = ort_session(proto.SerializeToString(), optimize=optimize)",
        _THREADS,
    ),
    "qatkd.export.codes.x_code_runner__mutmut_19": (
        "session = ort_session(proto.SerializeToString(), threads=2, optimize=optimize)",
        _THREADS,
    ),
    "qatkd.export.codes.x_code_runner__mutmut_30": (
        "hint: value if hint == OUTPUT_NAME else value.astype(None) - tensors[hint][1]",
        "the cast only keeps the uint8 codes from wrapping below zero when the zero point is "
        "subtracted; float64 (astype(None)) holds the same integers, and every reader compares "
        "values",
    ),
    **_strict_zip(_RUNNER, (34, 37, 38), _RUNNER_ZIP, ")"),
    "qatkd.export.codes.xǁCodeMismatchǁadd__mutmut_39": (
        "exact &= ~(diff > 0).reshape(len(exact), -2).any(1)",
        _ANY_NEGATIVE,
    ),
    "qatkd.export.codes.xǁCodeMismatchǁadd__mutmut_49": (
        "first_here = None",
        "`first_here` is only tested for truth; None is as false as False",
    ),
    "qatkd.export.codes.xǁCodeMismatchǁadd__mutmut_13": (
        "diff = np.abs(got[name].astype(None) - codes)",
        "numpy's astype(None) is astype(float64), the dtype the original names",
    ),
    "qatkd.export.codes.x_code_parity__mutmut_2": (
        'run = ""',
        "`run` is only tested for truth before the first batch sets it; '' is as false as None",
    ),
    **_alike(f"{_ENGINE}rng_states__mutmut_", _CUDA_RNG, _RNG_STATES),
    **_alike(f"{_ENGINE}set_rng_states__mutmut_", _CUDA_RNG, _SET_RNG_STATES),
    f"{_FIT}2": (
        "world = world and World()",
        "the pipeline and the torchrun worker always pass a World; None is only a default",
    ),
    f"{_FIT}5": ("model.to(None)", _TO_DEVICE),
    f"{_FIT}6": ("balancer.to(None)", _TO_DEVICE),
    f"{_FIT}436": ("set_rng_states(rng, None)", _CUDA_RNG),
    f"{_FIT}460": (
        "batch = to_device(batch, None)",
        "not equivalent on a GPU: `.to(None)` leaves a CPU tensor where it is, and the tests "
        "train on the CPU",
    ),
    f"{_FIT}569": (
        "rate = (sums[3] - units_before) / world.size / elapsed",
        "not equivalent with two processes or more: dividing by a world of one multiplies by it "
        "(the shown rate's other mutants are killed by "
        "test_each_epoch_shows_its_progress_and_a_resumed_one_counts_from_where_it_stopped)",
    ),
    **_alike(_FIT, _REFRESH, {573: "refresh=None,", 575: ")", 587: "refresh=True,"}),
    **_alike(
        _FIT,
        _UNITS_ARE_SAMPLES,
        {581: ("3", "2"), 586: ("2", "3")},
        '{"loss": f"{sums[0] / sums[{}]:.3f}", "acc": f"{sums[1] / sums[{}]:.1f}"}',
    ),
    **_alike(
        _FIT,
        _SCHEDULER_WARNING,
        {
            516: "",
            520: '"detected call of `lr_scheduler.step"',
            521: '"DETECTED CALL OF `LR_SCHEDULER.STEP"',
        },
        'warnings.filterwarnings("ignore", {})',
    ),
    f"{_FIT}701": (
        "if run_ends or time.monotonic() - last_drawn > REDRAW_SECONDS:",
        "the clock moves on between two epochs' ends: the time since the last drawing equals "
        "the period only by the chance of one float, where drawing or not changes no result",
    ),
    f"{_FIT}606": ('"lr": schedule.get_last_lr()[1],', _SAME_RATE),
    f"{_FIT}681": ("lr = schedule.get_last_lr()[1]", _SAME_RATE),
    f"{_FIT}414": (
        "done, sums, rng = 0, [0.0, 0.0, 0, 1], None  # sums: loss, acc, samples, units",
        "the units' sum is read only as a difference from its value at the epoch's start (the "
        "progress bar's rate) and carried in a stop's position: an offset cancels",
    ),
    f"{_FIT}316": ('where = f" ({name})" if (name) or True else ""', _SAME_WEIGHTS),
    f"{_FIT}317": ('where = f" ({name})" if name else "XXXX"', _SAME_WEIGHTS),
    **_alike(
        _FIT,
        _DDP_DEVICE,
        {
            213: "device_ids=None",
            215: ")",
            216: 'device_ids=[device.index] if (device.type == "cuda") and False else None',
            219: 'device_ids=[device.index] if device.type == "XXcudaXX" else None',
            220: 'device_ids=[device.index] if device.type == "CUDA" else None',
        },
        "model, {}",
    ),
    f"{_FIT}42": (
        ")",  # the loader's `**loader_options(device)` dropped
        "not equivalent on a GPU: `loader_options` is {} on the CPU (pinned memory and loader "
        "workers only feed a GPU), and the tests train on the CPU",
    ),
    f"{_FIT}43": (
        "drop_last=len(train_set) >= train_cfg.batch_size,",
        "with exactly one batch of samples there is no partial batch for drop_last to drop",
    ),
    **_alike(
        _FIT,
        _SCALER,
        {86: "None, enabled=precision.scaled", 87: "device.type, enabled=None"},
        "scaler = torch.amp.GradScaler({})",
    ),
    f"{_FIT}88": (
        "scaler = torch.amp.GradScaler(enabled=precision.scaled)",
        'GradScaler\'s device defaults to "cuda", the only device it is ever enabled on',
    ),
    f"{_FIT}89": (
        "scaler = torch.amp.GradScaler(device.type, )",
        "an enabled scaler on the CPU multiplies the loss by a power of two and divides the "
        "gradients by it again, which is exact in float; only an overflow would differ",
    ),
    f"{_FIT}93": (f"sign = 2.0 if task.maximize else -1.0{_SIGN}", _ORDER),
    f"{_FIT}95": (f"sign = 1.0 if task.maximize else -2.0{_SIGN}", _ORDER),
    f"{_FIT}113": (
        "start_epoch, step, best, best_epoch = 0, 0, -math.inf, 1",
        "every finite metric beats the initial -inf, so the first epoch always replaces the "
        "initial best_epoch",
    ),
    **_alike(
        _FIT,
        _SCALER_STATE,
        {
            159: "if resume.get(None):",
            160: 'if resume.get("XXscalerXX"):',
            161: 'if resume.get("SCALER"):',
            162: "scaler.load_state_dict(None)",
            163: 'scaler.load_state_dict(resume["XXscalerXX"])',
            164: 'scaler.load_state_dict(resume["SCALER"])',
            273: '"XXscalerXX": scaler.state_dict(),',
            274: '"SCALER": scaler.state_dict(),',
        },
    ),
    f"{_OPS}linear__mutmut_21": (
        'return b.emit("Gemm", b.layer_inputs(m, x, hint), hint, transB=2)',
        "onnxruntime reads Gemm's transB as a flag (gemm_base.h: any non-zero value transposes)",
    ),
    f"{_OPS}_flatten__mutmut_14": (
        'return b.emit_moving("Flatten", [x], hint, axis=None)',
        _FLATTEN_AXIS,
    ),
    f"{_OPS}_flatten__mutmut_18": ('return b.emit_moving("Flatten", [x], hint, )', _FLATTEN_AXIS),
    f"{_OPS}reshape__mutmut_10": (
        'target = b.const(np.array(shape, dtype=None), f"{hint}.shape")',
        _INT64,
    ),
    f"{_OPS}reshape__mutmut_12": ('target = b.const(np.array(shape, ), f"{hint}.shape")', _INT64),
    f"{_OPS}split_part__mutmut_18": (
        'b.const(np.array([v], dtype=None), f"{hint}.{what}")',
        _INT64,
    ),
    f"{_OPS}split_part__mutmut_20": ('b.const(np.array([v], ), f"{hint}.{what}")', _INT64),
    **_alike(
        f"{_OPS}split_part__mutmut_",
        _NAME,
        {
            21: ("XXstartXX", "end", "axis"),
            22: ("START", "end", "axis"),
            23: ("start", "XXendXX", "axis"),
            24: ("start", "END", "axis"),
            26: ("start", "end", "XXaxisXX"),
            27: ("start", "end", "AXIS"),
        },
        'for what, v in (("{}", start), ("{}", start + sizes[index]), ("{}", dim))',
    ),
    f"{_OPS}average_pool__mutmut_27": (
        'f"{hint}.average" if (divisor) and False else hint,',
        _NAME,
    ),
    f"{_OPS}average_pool__mutmut_28": ('f"{hint}.average" if (divisor) or True else hint,', _NAME),
    f"{_DIST}any_rank__mutmut_4": (
        "value = torch.tensor(float(flag), device=None)  # nccl reduces GPU tensors only",
        _NCCL,
    ),
    f"{_DIST}any_rank__mutmut_6": (
        "value = torch.tensor(float(flag), )  # nccl reduces GPU tensors only",
        _NCCL,
    ),
    f"{_DIST}mean_over_ranks__mutmut_3": (
        "value = value.to(None).clone()  # nccl reduces GPU tensors only",
        _NCCL,
    ),
    f"{_HELD}__init____mutmut_7": (
        "self._order: tuple[int, list[int]] = (-2, [])",
        "cycles count from 0: any negative cycle means that no permutation is drawn yet",
    ),
    f"{_HELD}observe__mutmut_7": (
        "batch = to_device(default_collate(samples), None)",
        _BATCH_TO_CPU,
    ),
    f"{_HELD}observe__mutmut_14": (
        "with torch.autocast(device, None, enabled=self.precision.enabled):",
        _CPU_AUTOCAST,
    ),
    f"{_HELD}observe__mutmut_17": (
        "with torch.autocast(device, enabled=self.precision.enabled):",
        _CPU_AUTOCAST,
    ),
    f"{_HELD}_permutation__mutmut_1": (
        "if self._order[1] != cycle:",
        "a list never equals a cycle, so the permutation is drawn again on every call: the same "
        "one, from the same seed and cycle (only slower)",
    ),
    f"{_HELD}_permutation__mutmut_5": (
        "generator = torch.Generator().manual_seed(self.seed * 1_000_003 - cycle)",
        "any map of (seed, cycle) to distinct integers serves; this one keeps them distinct too",
    ),
    f"{_HELD}_permutation__mutmut_7": (
        "generator = torch.Generator().manual_seed(self.seed * 1000004 + cycle)",
        "any map of (seed, cycle) to distinct integers serves; this one keeps them distinct too",
    ),
    f"{_STEPS}4": ("balancer.to(None)", _TO_DEVICE),
    f"{_STEPS}15": (
        "loader = DataLoader(train_set, batch_size=config.train.batch_size, shuffle=None)",
        _ANY_ORDER,
    ),
    f"{_STEPS}18": (
        "loader = DataLoader(train_set, batch_size=config.train.batch_size, )",
        _ANY_ORDER,
    ),
    f"{_STEPS}19": (
        "loader = DataLoader(train_set, batch_size=config.train.batch_size, shuffle=False)",
        _ANY_ORDER,
    ),
    f"{_STEPS}48": (
        "scaler = torch.amp.GradScaler(None, enabled=precision.scaled)",
        _CPU_SCALER,
    ),
    f"{_STEPS}49": (
        "scaler = torch.amp.GradScaler(device.type, enabled=None)",
        _CPU_SCALER,
    ),
    f"{_STEPS}50": ("scaler = torch.amp.GradScaler(enabled=precision.scaled)", _CPU_SCALER),
    f"{_STEPS}51": ("scaler = torch.amp.GradScaler(device.type, )", _CPU_SCALER),
    f"{_STEPS}78": ('if device.type == "XXcudaXX":', _CUDA_ONLY),
    f"{_STEPS}79": ('if device.type == "CUDA":', _CUDA_ONLY),
    f"{_STEPS}80": ("torch.cuda.synchronize(None)", _CUDA_ONLY),
    f"{_STEPS}91": ("batch = to_device(batch, None)", _BATCH_TO_CPU),
    f"{_STEPS}124": (
        "optimizer_step(total, optimizer, scaler, World(), None, kd_parts)",
        _ONE_PROCESS,
    ),
    f"{_STEPS}125": (
        "optimizer_step(total, optimizer, scaler, World(), balancer, None)",
        _ONE_PROCESS,
    ),
    f"{_STEPS}130": ("optimizer_step(total, optimizer, scaler, World(), kd_parts)", _ONE_PROCESS),
    f"{_STEPS}131": (
        "optimizer_step(total, optimizer, scaler, World(), balancer, )",
        _ONE_PROCESS,
    ),
    f"{_PARTS}4": ("device = None", _TO_DEVICE),
    f"{_PARTS}6": (
        "with torch.random.fork_rng(devices=None):",
        "not equivalent on a GPU: `devices=None` forks every CUDA device's generator too, of "
        "which a CPU-only machine has none",
    ),
    f"{_PARTS}10": ("example = to_device(default_collate([train_set[0]]), None)", _BATCH_TO_CPU),
    f"{_PARTS}14": (
        "example = to_device(default_collate([train_set[1]]), device)",
        "the example only shows the parts the student's and the teachers' feature widths, the "
        "same for every sample; their initial values come from the seed",
    ),
    f"{_PARTS}25": ("return None if parts is None else parts.to(None)", _TO_DEVICE),
    "qatkd.train.step.x_forward_losses__mutmut_1": (
        "step: int = 1,",
        "`step` is read only with a held-out pass, and the engine, the one caller that passes a "
        "pass, passes its step too",
    ),
    "qatkd.train.step.x_forward_losses__mutmut_5": (
        "with torch.autocast(device.type, None, enabled=precision.enabled):",
        _CPU_AUTOCAST,
    ),
    "qatkd.train.step.x_forward_losses__mutmut_8": (
        "with torch.autocast(device.type, enabled=precision.enabled):",
        _CPU_AUTOCAST,
    ),
    f"{_DIST}broadcast__mutmut_4": ("dist.broadcast_object_list(box, src=None)", _SOURCE_0),
    f"{_DIST}broadcast__mutmut_6": ("dist.broadcast_object_list(box, )", _SOURCE_0),
    f"{_OPS}concat__mutmut_54": ("return b.dequantize(codes, first.r, None)", _NAME),
    f"{_OPS}global_mean__mutmut_26": (
        'return b.emit_moving("Flatten", [pooled], f"{hint}.flatten", axis=None)',
        _FLATTEN_AXIS,
    ),
    f"{_OPS}global_mean__mutmut_30": (
        'return b.emit_moving("Flatten", [pooled], f"{hint}.flatten", )',
        _FLATTEN_AXIS,
    ),
    f"{_ISLAND}24": (
        "inputs.sort(key=None)",
        "fx nodes compare by their place in the graph, the order `_order` gives",
    ),
    **_alike(
        _ISLAND,
        _STRICT_ZIP,
        {
            52: ("strict=None", "strict=True"),
            55: ("", "strict=True"),
            56: ("strict=False", "strict=True"),
            59: ("strict=True", "strict=None"),
            62: ("strict=True", ""),
            63: ("strict=True", "strict=False"),
        },
        _ISLAND_ZIP,
    ),
    f"{_ISLAND}66": (
        "torch.backends.mha.set_fastpath_enabled(None)",
        "torch takes None for False here: the fast path is off either way (True is killed)",
    ),
    f"{_ISLAND}74": (
        "dynamo=None,",
        "torch.onnx.export takes its dynamo path only for `dynamo is True`: None is the "
        "TorchScript exporter, as False",
    ),
    f"{_CODE_OF}2": ("return r.qmin if (value < 0) and False else r.qmax", _BOUNDS),
    f"{_CODE_OF}4": ("return r.qmin if value <= 0 else r.qmax", _BOUNDS),
    f"{_CODE_OF}5": ("return r.qmin if value < 1 else r.qmax", _BOUNDS),
    f"{_CODE_OF}13": ("return int(np.clip(code, None, r.qmax))", _ONE_CALLER),
    f"{_CODE_OF}14": ("return int(np.clip(code, r.qmin, None))", _ONE_CALLER),
    f"{_GRAPH}emit_moving__mutmut_22": (
        "return self.dequantize(codes, source.r, None)",
        _NAME,
    ),
    f"{_GRAPH}_emit_island__mutmut_27": (
        "renamed[name] = self.name(f\"{hint}.{_SAFE.sub('_', name).strip('XX_XX')}\")",
        _NAME,
    ),
    f"{_ISLAND}111": (
        'what = "XX, XX".join(f"\'{op_name(n)}\'" for n in members)',
        "reached only where every op of the island exports alone and not together, which no "
        "op torch.onnx writes does (an op that fails alone is named alone)",
    ),
    f"{_GRAPH}qdq__mutmut_18": (
        "return self.dequantize(codes, r, None), r.scale",
        _NAME,
    ),
    f"{_GRAPH}qdq__mutmut_33": (
        "self._widened[codes] = self._widen(codes, r, shift, None)",
        _NAME,
    ),
    f"{_GRAPH}layer_inputs__mutmut_118": (
        "b_codes = None if b_scale is None else np.round(bias_values.astype(None) / b_scale)",
        "numpy's astype(None) is astype(float64), the dtype the original names",
    ),
    **_alike(
        _QUANTIZE,
        _OFFSET_RANGE,
        {54: "0, None, 8", 55: "0, 255, None", 62: "1, 255, 8", 63: "0, 256, 8", 64: "0, 255, 9"},
        "ActRange(HARDSIGMOID_RANGE / 2, {}),",
    ),
    **_alike(
        _QUANTIZE,
        _WIDE_RANGE,
        {77: "None, r.qmax, r.bits", 78: "r.qmin, None, r.bits", 79: "r.qmin, r.qmax, None"},
        "wide = ActRange(HARDSIGMOID_RANGE * r.scale, {})",
    ),
    f"{_QUANTIZE}39": ("None,", _NAME),
    f"{_QUANTIZE}88": ("return self._quantize(shifted, wide, zero_point, None, low, high)", _NAME),
    f"{_QUANTIZE}100": (
        "return self._quantize(source.input, r, zero_point, None, low, high)",
        _NAME,
    ),
    f"{_QUANTIZE}110": ("inner_hint = None", _NAME),
    f"{_QUANTIZE}115": (
        "inner = self._quantize(source.input, r, zero_point, None, low, high)",
        _NAME,
    ),
    **_alike(
        f"{_GRAPH}build__mutmut_",
        "only the output Identity's node name, which ONNX keeps for diagnostics: no op or "
        "runtime reads it",
        {69: "name=None", 73: ")"},
        '"Identity", [self.names[result]], [OUTPUT_NAME], {}',
    ),
    **_alike(
        f"{_GRAPH}emit_hardsigmoid__mutmut_",
        "ONNX's HardSigmoid defaults beta to 0.5, the value written",
        {7: "beta=None", 14: ")"},
        '"HardSigmoid", [x], hint, low=0.0, high=1.0, alpha=1 / HARDSIGMOID_RANGE, {}',
    ),
    "qatkd.export.frozen.x_tensor_hint__mutmut_6": (
        'return getattr(quantizer, "tensor_hint", ) or default',
        "every quantizer has the attribute (`Quantizer.tensor_hint`, None unless `prepare` "
        "names it), so the default of getattr is never used",
    ),
    "qatkd.export.onnx_fallback.x_run_examples__mutmut_5": (
        "interpreter = fx.Interpreter(gm, garbage_collect_values=None)",
        "None is as false as False: the interpreter keeps every value either way",
    ),
    **_alike(
        f"{_GRAPH}_float_bias_where_unfused__mutmut_",
        "every Conv's output has a reader: `_drop_unused` removed the unread nodes first, "
        "and the last one is read by the output's Identity",
        {15: "None", 17: ""},
        "readers = users.get(node.output[0], {})",
    ),
    **_alike(
        f"{_GRAPH}build__mutmut_",
        "only the graph's name, which nothing reads",
        {113: "XXqatkdXX", 114: "QATKD"},
        'return helper.make_graph(self.nodes, "{}", inputs, outputs, self.inits)',
    ),
    **_alike(
        f"{_GRAPH}name__mutmut_",
        _NAME,
        {
            9: 'base = hint.replace(".", "_") or "XXtXX"',
            10: 'base = hint.replace(".", "_") or "T"',
            12: "name, i = base, 2",
            15: 'name, i = f"{base}_{i}", i - 1',
            16: 'name, i = f"{base}_{i}", i + 2',
        },
    ),
    **_alike(
        f"{_GRAPH}const__mutmut_",
        "`numpy_helper.from_array` writes the values in C order whatever the array's layout",
        {9: "order=None", 11: "", 13: 'order="c"'},
        "numpy_helper.from_array(np.array(array, {}), name)",
    ),
    f"{_GRAPH}_handler__mutmut_14": (
        'hint = str(node.target) if (node.op == "call_module") or True else node.name',
        _NAME,
    ),
    f"{_GRAPH}_handler__mutmut_26": (
        "if handler is None or not tensors and len(node.all_input_nodes) != 1:",
        "every registered module reads one tensor; an Identity given more returns its first, "
        "as its handler (`pass_through`) does",
    ),
    f"{_FIT}23": (
        "train_set, num_replicas=world.size, rank=world.rank, seed=config.seed",
        "DistributedSampler shuffles by default (shuffle=None is killed: test_each_epoch_"
        "shuffles_the_training_images_and_the_seed_decides_the_order)",
    ),
    **_alike(
        "qatkd.train.logs.xǁCsvLogǁappend__mutmut_",
        _NEWLINE,
        {2: "newline=None", 4: ""},
        'with self.path.open("a", {}) as f:',
    ),
    "qatkd.train.logs.xǁCsvLogǁstart__mutmut_5": (
        "with self.path.open(newline=None) as f:",
        _NEWLINE_READ,
    ),
    "qatkd.train.logs.x_read_csv__mutmut_2": ("with path.open(newline=None) as f:", _NEWLINE_READ),
    **_alike(
        "qatkd.train.logs.xǁCsvLogǁstart__mutmut_",
        _NEWLINE,
        {14: "newline=None", 16: ""},
        'with self.path.open("w", {}) as f:',
    ),
    "qatkd.train.logs.xǁCsvLogǁappend__mutmut_16": (
        'csv.DictWriter(f, self.fields, extrasaction="IGNORE").writerow(',
        'DictWriter checks extrasaction case-insensitively and raises only for "raise": '
        '"IGNORE" ignores',
    ),
    **_alike(
        "qatkd.train.task.xǁTaskǁevaluate__mutmut_",
        "the default of a Protocol's signature: no one calls the Protocol, each family's "
        "`evaluate` has its own",
        {1: "XXtestXX", 2: "TEST"},
        'self, model: nn.Module, loader: DataLoader, split: str = "{}"',
    ),
    **_alike(
        "qatkd.train.logs.xǁCsvLogǁstart__mutmut_",
        "the rows it writes back were read from the log under the same columns (a resume "
        "takes the run's own config): no row has a column to ignore or to raise for",
        {26: "", 28: 'extrasaction="IGNORE"'},
        "writer = csv.DictWriter(f, self.fields, {})",
    ),
    f"{_PLOT}42": (
        "fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=None)",
        "None is as false as False: subplots keeps the 2-D array of axes",
    ),
    **_strict_zip(
        _PLOT,
        (54, 57, 59),
        "for ax, panel in zip(axes[0], panels, ",
        "):",
    ),
    f"{_PLOT}233": (
        'twin.plot(s, cosine, color="TAB:RED", marker=".", label="cosine")',
        "matplotlib reads colour names case-insensitively: the same red",
    ),
    **_strict_zip(  # each point is a (step, ratio, cosine) triple
        _PLOT,
        (194, 196, 197),
        "s, ratio, cosine = zip(*pts, ",
        ")",
    ),
    # each point is a (step or epoch, value) pair
    **_strict_zip(_PLOT, (78, 80, 81), _PLOT_ZIP, '), marker=".", label=key)'),
    **_strict_zip(_PLOT, (120, 122, 123), _PLOT_ZIP, '), marker="o", label=key)'),
    **_strict_zip(_PLOT, (153, 155, 156), _PLOT_ZIP, '), marker=".", label=key)'),
    **_alike(
        _PLOT,
        "the conflict panel is the `else` of the panels' if/elif chain: any name the other "
        "branches do not test draws it",
        {35: "None", 36: '"XXconflictXX"', 37: '"CONFLICT"'},
        "panels.append({})",
    ),
    "qatkd.export.onnx_ops.x_conv__mutmut_7": (
        "weight_shape = m.codes.shape if (isinstance(m, FrozenConv2d)) and False else "
        "m.weight.shape",
        "a FrozenConv2d's `weight` (codes times scales) has its codes' shape",
    ),
    "qatkd.train.validation.x_split_indices__mutmut_33": (
        "if size == 0 and len(group) >= 1:",
        "a class of one sample taken to 1 is cut back to 0 by `min(size, len(group) - 1)` on "
        "the next line",
    ),
}
"""Surviving mutant -> (its mutated line, why no test can tell it from the original). The line
ties the note to the change it was written for: mutmut numbers mutants per function, so an edit
of the function renumbers them and a stale note no longer applies."""
