"""The tf.data input pipeline: prepared shards -> per-host batches -> global jax.Arrays.

Each process reads its share of the global batch, applies a pp string
(``ops.py``) and batches it; ``global_batch`` assembles the per-host batches
into arrays sharded over the mesh. Training streams are infinite and a
function of the seed and a stream position alone (shuffle, epoch reshuffles
and augmentation alike, read by random access from the shards), so a few
integers resume them exactly, with any number of processes
(``TrainIterator``). Evaluation streams read each process's disjoint part of
a split (``dataset_format.read_split``) in order, cover each example once and
give every process the same number of batches.
``check_video_shape`` (``check_clip_shape``) checks that a pp's clips are the model's
frames and size.

Not here: preprocessing ops (``ops.py``), the on-disk format
(``dataset_format.py``), decoding source videos (``prepare.py``).
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import weakref
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from input_pipeline import (
    dataset_format,
    location_ops,  # noqa: F401 (registers the location tasks' ops)
    ops,
)

# TensorFlow only reads and augments on the host; keep it off the accelerators JAX uses.
try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices (someone used it first).
    pass

MASK_KEY = "_mask"
VIDEO_MASK_KEY = "video_mask"
ROW_KEY = "row"


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = True
    options.threading.max_intra_op_parallelism = 1
    return options


def _part_sizes(data_dir: str, split: str, process_count: int) -> list[int]:
    """How many examples each process's part of `split` holds (as ``read_split`` divides it)."""
    info = dataset_format.builder(data_dir).info
    if split not in info.splits:
        raise ValueError(f"split {split!r} not in {data_dir}; it has {sorted(info.splits.keys())}")
    parts = tfds.even_splits(split, n=process_count)
    return [info.splits[part].num_examples for part in parts]


def _check_process(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in [0, process_count={process_count}), got {process_index}"
        )


def _stream_positions(
    start_position: int, batch_size: int, process_index: int, process_count: int
) -> tf.data.Dataset:
    """This process's positions in the global stream, from `start_position` on: the
    global batch of step s holds positions start + s*G .. start + (s+1)*G - 1 (G =
    batch_size * process_count), and process p takes the p-th run of batch_size of
    them. So the global batch is the same whatever the number of processes."""
    global_batch = batch_size * process_count

    def position(k: tf.Tensor) -> tf.Tensor:
        return start_position + (k // batch_size) * global_batch + process_index * batch_size + (
            k % batch_size
        )

    return tf.data.Dataset.counter().map(position)


def _unit_at(position: tf.Tensor, seed: int, num_units: int) -> tf.Tensor:
    """The unit (video or study) at global `position`: epoch e = position // num_units
    visits every unit once, in the order of a seeded random bijection of that epoch."""
    epoch = position // num_units
    seed_vector = tf.stack([tf.constant(seed, tf.int64), epoch])  # [2]: TF pads it to [3]
    return tf.random.experimental.index_shuffle(
        position % num_units, seed=seed_vector, max_index=num_units - 1
    )


def _record_reader(index: dataset_format.RecordIndex):
    """A tf function: int64 record numbers [n] -> their serialised examples [n]."""

    def read(records: tf.Tensor) -> tf.Tensor:
        return tf.constant(dataset_format.read_records(index, records.numpy()), tf.string)

    def read_op(records: tf.Tensor) -> tf.Tensor:
        out = tf.py_function(read, [records], tf.string)
        out.set_shape([None])
        return out

    return read_op


def _with_seed(seed: int):
    """Adds the augmentation seed of the example at global `position`."""
    base = tf.constant([seed, 0], tf.int64)

    def add(position: tf.Tensor, example: dict) -> dict:
        return {**example, ops.SEED_KEY: tf.random.experimental.stateless_fold_in(base, position)}

    return add


def make_train_dataset(
    data_dir: str,
    split: str,
    pp: str,
    batch_size: int,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_position: int = 0,
    num_parallel_calls: int = tf.data.AUTOTUNE,
    prefetch: int = 2,
    study_videos: int | None = None,
) -> tf.data.Dataset:
    """An infinite, shuffled stream of this process's batches of `batch_size` examples.

    The stream is a function of (seed, position) alone: global position g is
    epoch g // U's unit number g % U in a seeded random order of the split's U
    units (videos, or studies with `study_videos`), read by random access
    (``dataset_format.record_index``), with augmentation seed fold_in(seed, g).
    Each global batch is G = batch_size * process_count consecutive positions,
    process p taking its p-th run of `batch_size` (``_stream_positions``), so
    the global batch at a step is the same examples for any number of
    processes, and `start_position` (a multiple of G: ``TrainIterator``
    keeps it) resumes the stream exactly. The ops run with ``train=True`` and
    ``data_dir`` in their context.

    Study-level (``study_videos=N``): one example per study, every key of the pp
    output stacked to [N, ...] plus ``video_mask`` [N] bool. A study with fewer
    than N videos fills the remaining slots with copies of its videos marked
    False in ``video_mask`` (real videos come first, so slot 0 is always real);
    one with more contributes a random subset of N (seeded, in view order).
    Study-level fields (report, text ids, labels) repeat in every slot.

    Records are read by Python (``tf.py_function``): an iterator of this dataset
    must be deleted before the interpreter exits (tf.data threads reading while
    it shuts down abort the process). ``TrainIterator`` does that for you.
    """
    _check_process(process_index, process_count)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if study_videos is not None and study_videos <= 0:
        raise ValueError(f"study_videos must be positive or None, got {study_videos}")
    if start_position < 0:
        raise ValueError(f"start_position must be >= 0, got {start_position}")
    preprocess = ops.get_preprocess_fn(pp, train=True, data_dir=data_dir)
    index = dataset_format.record_index(data_dir, split)
    features = dataset_format.builder(data_dir).info.features
    decoders = {"frames": tfds.decode.SkipDecoding()}
    read = _record_reader(index)

    def parse(serialized: tf.Tensor) -> dict:
        return features.deserialize_example(serialized, decoders=decoders)

    positions = _stream_positions(start_position, batch_size, process_index, process_count)
    if study_videos is None:
        num_units = index.num_records

        def read_video(position: tf.Tensor) -> tuple[tf.Tensor, dict]:
            record = _unit_at(position, seed, num_units)
            return position, parse(read(record[None])[0])

        ds = positions.map(read_video, num_parallel_calls=num_parallel_calls, deterministic=True)
        ds = ds.map(_with_seed(seed))
        ds = ds.map(preprocess, num_parallel_calls=num_parallel_calls, deterministic=True)
    else:
        num_units = index.num_studies
        study_start = tf.constant(index.study_start, tf.int64)

        def study_videos_at(position: tf.Tensor) -> tf.data.Dataset:
            study = _unit_at(position, seed, num_units)
            records = tf.range(study_start[study], study_start[study + 1])
            videos = tf.data.Dataset.from_tensor_slices(read(records)).map(parse)
            return videos.map(lambda video: {**video, _POSITION_KEY: position})

        ds = _group_studies(positions.flat_map(study_videos_at))
        ds = ds.map(_study_seed(seed))
        ds = ds.map(_select_videos(study_videos), num_parallel_calls=num_parallel_calls)
        ds = ds.unbatch().map(
            _study_slot_preprocess(preprocess),
            num_parallel_calls=num_parallel_calls,
            deterministic=True,
        )
        ds = ds.batch(study_videos, drop_remainder=True)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(prefetch)
    return ds.with_options(_options())


_POSITION_KEY = "_position"


def _study_seed(seed: int):
    """A study example (its videos' fields stacked) -> its augmentation seed from the
    global position its videos carry."""
    add = _with_seed(seed)

    def with_seed(study: dict) -> dict:
        position = study.pop(_POSITION_KEY)[0]
        return add(position, study)

    return with_seed


def _read_studies(
    data_dir: str, split: str, process_index: int, process_count: int
) -> tf.data.Dataset:
    """This process's whole studies of `split`, in order, one example of stacked videos each.

    The part boundaries are those of ``read_split``; a study that straddles one
    belongs to the part holding its first video, which reads past its end to
    finish it. In a study example every field is stacked to [n] except
    ``frames``, the n videos' encoded frames concatenated (``num_frames`` [n]
    gives each video's length).
    """
    sizes = _part_sizes(data_dir, split, process_count)
    start = sum(sizes[:process_index])
    end = start + sizes[process_index]
    ds = dataset_format.builder(data_dir).as_dataset(
        split=f"{split}[{start}:]",
        shuffle_files=False,
        decoders={"frames": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(
            interleave_cycle_length=1, skip_prefetch=True, try_autocache=False
        ),
    )

    def study_start(position: tf.Tensor, example: dict) -> tf.Tensor:
        return position - tf.cast(example["video_in_study"], tf.int64)

    def starts_before_end(position: tf.Tensor, example: dict) -> tf.Tensor:
        return study_start(position, example) < end

    def starts_in_part(position: tf.Tensor, example: dict) -> tf.Tensor:
        return study_start(position, example) >= start

    def drop_position(position: tf.Tensor, example: dict) -> dict:
        return example

    ds = ds.enumerate(start).take_while(starts_before_end).filter(starts_in_part)
    return _group_studies(ds.map(drop_position))


def _group_studies(videos: tf.data.Dataset) -> tf.data.Dataset:
    """Consecutive videos of one study -> one study example (see ``_read_studies``).

    A scan accumulates the current study and emits it at its last video
    (``video_in_study == videos_in_study - 1``); videos out of order raise.
    """

    def empty(spec: tf.TensorSpec) -> tf.Tensor:
        return tf.zeros([0, *spec.shape], spec.dtype)

    # Lesion boxes (any number per video) are not carried into studies: the location
    # tasks are per video.
    fields = {k: v for k, v in videos.element_spec.items() if k not in ("frames", "lesions")}
    initial = {
        "frames": tf.zeros([0], tf.string),
        **tf.nest.map_structure(empty, fields),
    }

    def add_video(study: dict, video: dict) -> tuple[dict, tuple[tf.Tensor, dict]]:
        index = video["video_in_study"]
        held = tf.shape(study["row"])[0] * tf.cast(index > 0, tf.int32)  # 0 starts a new study
        check = tf.debugging.Assert(
            tf.equal(index, held),
            [
                "study videos are not consecutive and in order: got video_in_study",
                index,
                "of study_index",
                video["study_index"],
                "after",
                held,
                "videos",
            ],
        )
        with tf.control_dependencies([check]):
            frames_held = tf.shape(study["frames"])[0] * tf.cast(index > 0, tf.int32)
        grown = {"frames": tf.concat([study["frames"][:frames_held], video["frames"]], axis=0)}
        grown.update(
            tf.nest.map_structure(
                lambda acc, x: tf.concat([acc[:held], x[None]], axis=0),
                {k: study[k] for k in fields},
                {k: video[k] for k in fields},
            )
        )
        complete = tf.equal(index, video["videos_in_study"] - 1)
        return grown, (complete, grown)

    def is_complete(complete: tf.Tensor, study: dict) -> tf.Tensor:
        return complete

    def drop_flag(complete: tf.Tensor, study: dict) -> dict:
        return study

    return videos.scan(initial, add_video).filter(is_complete).map(drop_flag)


def _gather_slots(study: dict, chosen: tf.Tensor, study_videos: int) -> dict:
    """The `chosen` videos (indices into the study, at most `study_videos`) in
    `study_videos` slots: the remaining slots repeat the first chosen video,
    ``video_mask`` False. Frames are padded with '' to the longest video."""
    real = tf.shape(chosen)[0]
    slots = tf.concat([chosen, tf.fill([study_videos - real], chosen[0])], axis=0)
    frames = tf.RaggedTensor.from_row_lengths(study.pop("frames"), study["num_frames"])
    selected = tf.nest.map_structure(lambda x: tf.gather(x, slots), study)
    selected["frames"] = tf.gather(frames, slots).to_tensor()  # [study_videos, T_max]
    selected[VIDEO_MASK_KEY] = tf.range(study_videos) < real
    return selected


def _study_slot_preprocess(preprocess: Callable[[dict], dict]) -> Callable[[dict], dict]:
    """The pp of one video slot of a study: its own frames only (not the study's
    padding), its ``video_mask`` passed through."""

    def preprocess_slot(example: dict) -> dict:
        video_mask = example.pop(VIDEO_MASK_KEY)
        example["frames"] = example["frames"][: example["num_frames"]]
        return {**preprocess(example), VIDEO_MASK_KEY: video_mask}

    return preprocess_slot


def _pad_and_batch(
    ds: tf.data.Dataset, num_real: int, num_batches: int, batch_size: int, prefetch: int
) -> tf.data.Dataset:
    """`ds` (`num_real` examples) padded with ``_mask`` False examples to `num_batches`
    full batches of `batch_size`."""
    num_padding = num_batches * batch_size - num_real
    if num_padding:
        padding = _padding_example(ds.element_spec)
        ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(num_padding))
    return ds.batch(batch_size, drop_remainder=True).prefetch(prefetch).with_options(_options())


def _select_videos(study_videos: int):
    """[n, ...] study -> [study_videos, ...] with ``video_mask``, each slot its own ``_seed``."""

    def select(study: dict) -> dict:
        seed = study.pop(ops.SEED_KEY)
        count = tf.shape(study["row"])[0]
        fold_in = tf.random.experimental.stateless_fold_in
        draw = tf.random.stateless_uniform([count], fold_in(seed, 0))
        chosen = tf.sort(tf.argsort(draw)[:study_videos])  # a random subset, in view order
        selected = _gather_slots(study, chosen, study_videos)
        selected[ops.SEED_KEY] = tf.stack(
            [fold_in(seed, slot + 1) for slot in range(study_videos)]
        )  # [study_videos, 2]
        return selected

    return select


def make_eval_dataset(
    data_dir: str,
    split: str,
    pp: str,
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    num_parallel_calls: int = tf.data.AUTOTUNE,
    prefetch: int = 2,
) -> tf.data.Dataset:
    """A finite, ordered pass over this process's part of `split`, in batches of `batch_size`.

    Every example of the split appears exactly once over all processes, with
    ``_mask`` True; each process then pads with ``_mask`` False examples (zeros,
    empty strings) up to ``ceil(largest part / batch_size)`` full batches, so all
    processes yield the same number of batches. The ops run with
    ``train=False``; the pp output must have fixed shapes.
    """
    _check_process(process_index, process_count)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    preprocess = ops.get_preprocess_fn(pp, train=False, data_dir=data_dir)
    sizes = _part_sizes(data_dir, split, process_count)
    num_batches = math.ceil(max(sizes) / batch_size)
    ds = dataset_format.read_split(
        data_dir, split, process_index=process_index, process_count=process_count
    )
    ds = ds.map(
        lambda example: {**preprocess(example), MASK_KEY: tf.constant(True)},
        num_parallel_calls=num_parallel_calls,
        deterministic=True,
    )
    return _pad_and_batch(ds, sizes[process_index], num_batches, batch_size, prefetch)


def _studies_per_part(data_dir: str, split: str, process_count: int) -> list[int]:
    """How many studies each process's part of `split` holds: those whose first video
    lies in the part (as ``_read_studies`` assigns them)."""
    counts = []
    for part in tfds.even_splits(split, n=process_count):
        ds = dataset_format.builder(data_dir).as_dataset(
            split=part, shuffle_files=False, decoders={"frames": tfds.decode.SkipDecoding()}
        )
        firsts = ds.map(lambda example: tf.cast(example["video_in_study"] == 0, tf.int64))
        counts.append(int(firsts.reduce(tf.constant(0, tf.int64), lambda a, b: a + b)))
    return counts


def make_study_eval_dataset(
    data_dir: str,
    split: str,
    pp: str,
    batch_size: int,
    *,
    study_videos: int,
    process_index: int = 0,
    process_count: int = 1,
    num_parallel_calls: int = tf.data.AUTOTUNE,
    prefetch: int = 2,
) -> tf.data.Dataset:
    """A finite, ordered pass over this process's whole studies of `split`, in batches of
    `batch_size` studies.

    A study example holds its first `study_videos` videos in view order, each
    through the pp (``train=False``; it must keep 'video' and 'row') and stacked
    to [study_videos, ...], with
    ``video_mask`` [study_videos] (a study with fewer videos repeats its first in
    the remaining slots, marked False), ``row`` the manifest row of its first
    video and ``_mask`` True. Every study of the split appears exactly once over all
    processes; each process pads with ``_mask`` False studies up to the same
    number of batches, as ``make_eval_dataset`` does.
    """
    _check_process(process_index, process_count)
    if batch_size <= 0 or study_videos <= 0:
        raise ValueError(
            f"batch_size and study_videos must be positive, got {batch_size}, {study_videos}"
        )
    preprocess = ops.get_preprocess_fn(pp, train=False, data_dir=data_dir)
    counts = _studies_per_part(data_dir, split, process_count)
    num_batches = math.ceil(max(counts) / batch_size)

    def first_videos(study: dict) -> dict:
        count = tf.minimum(tf.shape(study["row"])[0], study_videos)
        return _gather_slots(study, tf.range(count), study_videos)

    def study_example(videos: dict) -> dict:
        return {"video": videos["video"], VIDEO_MASK_KEY: videos[VIDEO_MASK_KEY],
                ROW_KEY: videos[ROW_KEY][0], MASK_KEY: tf.constant(True)}

    ds = _read_studies(data_dir, split, process_index, process_count)
    ds = ds.map(first_videos, num_parallel_calls=num_parallel_calls, deterministic=True)
    ds = ds.unbatch().map(_study_slot_preprocess(preprocess),
                          num_parallel_calls=num_parallel_calls, deterministic=True)
    ds = ds.batch(study_videos, drop_remainder=True).map(study_example)
    return _pad_and_batch(ds, counts[process_index], num_batches, batch_size, prefetch)


def _padding_example(element_spec: dict) -> dict:
    def fill(path, spec: tf.TensorSpec) -> tf.Tensor:
        if not spec.shape.is_fully_defined():
            name = "/".join(str(getattr(p, "key", p)) for p in path)
            raise ValueError(
                f"make_eval_dataset: pp output {name!r} has shape {spec.shape}, not fixed; "
                "evaluation pads with fixed-shape examples: resize it or drop it with keep(...)"
            )
        if spec.dtype == tf.string:
            return tf.fill(spec.shape, "")
        return tf.zeros(spec.shape, spec.dtype)

    padding = jax.tree_util.tree_map_with_path(fill, element_spec)
    padding[MASK_KEY] = tf.constant(False)
    return padding


POSITION_FILE = "position.json"


def _close_at_exit(iterator_ref: weakref.ref) -> None:
    iterator = iterator_ref()
    if iterator is not None:
        iterator.close()


class TrainIterator:
    """The training stream (``make_train_dataset``) as numpy batches, with its position.

    The position is the global stream position of the next batch: a few integers
    (``state``), the same in every process. ``save`` writes them (process 0) and
    ``restore`` rebuilds the stream there, so a resumed run sees exactly the
    batches the saved one would have, with any number of processes (each then
    reads its own part of the same global batches) and any batch size.
    """

    def __init__(
        self,
        data_dir: str,
        split: str,
        pp: str,
        batch_size: int,
        *,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        study_videos: int | None = None,
        batch_map: Callable[[dict], dict] | None = None,
        **dataset_kwargs,
    ):
        """The arguments of ``make_train_dataset``; `batch_map`, a function of each
        batch applied in the dataset."""
        make = functools.partial(
            make_train_dataset,
            data_dir,
            split,
            pp,
            batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            study_videos=study_videos,
            **dataset_kwargs,
        )
        self._make = lambda start_position: (
            make(start_position=start_position).map(batch_map)
            if batch_map
            else make(start_position=start_position)
        )
        self.global_batch = batch_size * process_count
        index = dataset_format.record_index(data_dir, split)
        self._identity = {
            "seed": int(seed),
            "split": split,
            "units": "studies" if study_videos else "videos",
            "num_units": index.num_studies if study_videos else index.num_records,
        }
        self._process_index = process_index
        self.position = 0
        # The stream from position 0 gives the element spec, and the first batch unless
        # a restore moves the position (building a stream traces its functions: about
        # a second).
        self._dataset_at_start = self._make(0)
        self.element_spec = self._dataset_at_start.element_spec
        # Made at the first batch, from the position restored by then: an iterator is
        # never replaced while its readers are busy.
        self._iterator = None
        atexit.register(_close_at_exit, weakref.ref(self))

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            dataset = self._dataset_at_start
            if dataset is None or self.position != 0:
                dataset = self._make(self.position)
            self._dataset_at_start = None
            self._iterator = iter(dataset)
        batch = tf.nest.map_structure(lambda t: t.numpy(), next(self._iterator))
        self.position += self.global_batch
        return batch

    def close(self) -> None:
        """Stops the stream's readers. Called at exit too: tf.data threads still running
        Python record reads when the interpreter shuts down can abort the process."""
        self._iterator = None

    def state(self) -> dict:
        """What `restore` needs: the position of the next batch and what the stream is
        of (seed, split, units and their number)."""
        return {"position": self.position, **self._identity}

    def save(self, directory: str) -> None:
        """Writes `state` as ``directory/position.json`` (process 0; the others' is the same)."""
        if self._process_index == 0:
            tf.io.gfile.makedirs(directory)
            with tf.io.gfile.GFile(os.path.join(directory, POSITION_FILE), "w") as f:
                f.write(json.dumps(self.state()))

    def restore(self, directory: str) -> None:
        """Continues from the position saved in `directory`."""
        path = os.path.join(directory, POSITION_FILE)
        if not tf.io.gfile.exists(path):
            found = sorted(tf.io.gfile.listdir(directory)) if tf.io.gfile.isdir(directory) else []
            raise FileNotFoundError(
                f"{path} not found (found {found}): a checkpoint from before data positions "
                "(it saved tf.data's iterator instead) cannot resume its data stream; start "
                "a new run from it with config.init"
            )
        with tf.io.gfile.GFile(path) as f:
            saved = json.loads(f.read())
        changed = {
            k: (saved.get(k), v) for k, v in self._identity.items() if saved.get(k) != v
        }
        if changed:
            raise ValueError(
                f"{path}: the data stream changed since it was saved ({changed}, as "
                "(saved, now)): the saved position means other examples now"
            )
        self.position = int(saved["position"])
        self._iterator = None  # the next batch starts a stream there


def global_batch(
    local_batch: dict[str, np.ndarray], mesh: Mesh, batch_axes: tuple[str, ...] = ("data",)
) -> dict[str, jax.Array]:
    """Assembles every process's local batch into global arrays sharded on `batch_axes`.

    The leading (batch) dimension is split over the mesh axes `batch_axes`; the
    other dimensions are replicated. The global batch is the processes' local
    batches concatenated in process order. Strings cannot become arrays: drop
    them with the pp op ``keep`` first.
    """
    sharding = NamedSharding(mesh, PartitionSpec(batch_axes))

    def to_global(path, x) -> jax.Array:
        x = np.asarray(x)
        if x.dtype.kind in "OSU":
            raise ValueError(
                f"global_batch: {jax.tree_util.keystr(path)} holds strings ({x.dtype}); "
                "keep only numeric keys (pp op keep(...))"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(to_global, local_batch)


def check_video_shape(
    video_shape: tuple[int, ...], config: ml_collections.ConfigDict, pp_key: str = "video_pp"
) -> None:
    """The pp's clips must be the model's (``model.num_frames`` x ``model.image_size``)."""
    size = config.model.image_size
    expected = (config.model.num_frames, *((size, size) if isinstance(size, int) else size))
    check_clip_shape(video_shape, expected, pp_key)


def check_clip_shape(
    video_shape: tuple[int, ...], expected: tuple[int, ...], pp_key: str = "video_pp"
) -> None:
    """``check_video_shape`` against `expected` (frames, height, width) of the model."""
    frames, height, width = video_shape[-4:-1]
    if (frames, height, width) != tuple(expected):
        raise ValueError(
            f"config.input.{pp_key} makes clips of {frames} x {height} x {width}, but "
            f"config.model.num_frames x image_size is {' x '.join(map(str, expected))}: "
            "change both together"
        )
