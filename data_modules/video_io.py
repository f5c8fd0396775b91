"""Reading and writing video files, and choosing which frames a clip is made of.

Decoding goes through a maintained library: PyAV (its wheels carry FFmpeg; the default) or
torchcodec (``data.video_decoder: torchcodec``; it needs FFmpeg's shared libraries on the
system). torchvision's video reading is deprecated and decord unmaintained.
``benchmarks/decode.py --videos`` measures both on the same files.

Frame choice (``sample_indices``), as CLIP4Clip and TSN do it: the video's frames (at its own
rate, or resampled to ``fps``) are cut into ``max_frames`` equal segments; evaluation takes the
middle frame of each, training one random frame of each. A video with fewer frames than
``max_frames`` gives all of them and the rest of the clip is padding, masked out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmlightning.errors import UserError

DECODERS = ("pyav", "torchcodec")


class VideoError(Exception):
    """A video file that cannot be decoded (corrupt, empty, not a video)."""


def check_decoder(name: str, key: str = "data.video_decoder") -> str:
    if name not in DECODERS:
        raise UserError(f"{key}: {name!r} is not a video decoder; valid: {', '.join(DECODERS)}.")
    try:
        __import__("av" if name == "pyav" else "torchcodec.decoders")
    except (ImportError, RuntimeError, OSError) as err:
        hint = "pip install av" if name == "pyav" else "pip install torchcodec (and FFmpeg's shared libraries)"
        raise UserError(f"{key}: {name} cannot be loaded here ({str(err).splitlines()[0]}); {hint}.") from None
    return name


def candidate_frames(num_frames: int, native_fps: float, fps: float | None) -> np.ndarray:
    """The frame indices a clip is drawn from: all of them, or those nearest to every 1/fps s."""
    if not fps or native_fps <= 0 or fps >= native_fps:
        return np.arange(num_frames)
    times = np.arange(0, num_frames / native_fps, 1.0 / fps)
    return np.unique(np.minimum(np.round(times * native_fps).astype(int), num_frames - 1))


def sample_indices(candidates: np.ndarray, max_frames: int, train: bool,
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """``max_frames`` of ``candidates`` (fewer if there are fewer), in time order: the middle
    of each equal segment for evaluation, a random member of each for training (TSN)."""
    n = len(candidates)
    if n <= max_frames:
        return candidates.copy()
    edges = np.linspace(0, n, max_frames + 1)
    starts, ends = np.floor(edges[:-1]).astype(int), np.floor(edges[1:]).astype(int)  # n > max_frames: never empty
    if train:
        picks = np.array([rng.integers(s, e) for s, e in zip(starts, ends)])
    else:  # the frame at each segment's centre
        picks = np.floor((np.arange(max_frames) + 0.5) * n / max_frames).astype(int)
    return candidates[picks]


def pad_clip(frames: np.ndarray, max_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(max_frames, H, W, 3) frames, zeros after the real ones, and the mask of the real ones."""
    clip = np.zeros((max_frames, *frames.shape[1:]), dtype=frames.dtype)
    clip[:len(frames)] = frames
    mask = np.zeros(max_frames, dtype=bool)
    mask[:len(frames)] = True
    return clip, mask


def probe(path: str | Path, decoder: str = "pyav") -> tuple[int, float]:
    """(frame count, frames per second) of a video file, without decoding its pictures."""
    try:
        if decoder == "torchcodec":
            from torchcodec.decoders import VideoDecoder

            meta = VideoDecoder(str(path)).metadata
            count = meta.num_frames
            return int(count or 0), float(meta.average_fps or 0.0)
        import av

        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            count = sum(1 for packet in container.demux(stream) if packet.size)  # one packet per frame
        if count == 0:
            raise VideoError(f"{path}: no frames")
        return count, fps
    except VideoError:
        raise
    except Exception as err:  # every library error means the same here: this file cannot be read
        raise VideoError(f"{path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


def decode(path: str | Path, indices: np.ndarray, decoder: str = "pyav") -> np.ndarray:
    """(len(indices), H, W, 3) uint8 RGB frames at ``indices`` (sorted, distinct), in that order."""
    wanted = [int(i) for i in indices]
    try:
        if decoder == "torchcodec":
            from torchcodec.decoders import VideoDecoder

            batch = VideoDecoder(str(path), dimension_order="NHWC").get_frames_at(wanted)
            return batch.data.numpy()
        import av

        keep, out = set(wanted), {}
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in keep:
                    out[i] = frame.to_ndarray(format="rgb24")
                if i >= wanted[-1]:
                    break
        missing = [i for i in wanted if i not in out]
        if missing:
            raise VideoError(f"{path}: frame {missing[0]} could not be decoded ({len(out)} of {len(wanted)} were)")
        return np.stack([out[i] for i in wanted])
    except VideoError:
        raise
    except Exception as err:
        raise VideoError(f"{path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


def read_clip(path: str | Path, max_frames: int, train: bool, rng: np.random.Generator | None = None,
              fps: float | None = None, decoder: str = "pyav") -> tuple[np.ndarray, np.ndarray]:
    """A padded clip of ``max_frames`` and its mask, sampled as ``sample_indices`` says."""
    count, native_fps = probe(path, decoder)
    indices = sample_indices(candidate_frames(count, native_fps, fps), max_frames, train, rng)
    return pad_clip(decode(path, indices, decoder), max_frames)


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8, lossless: bool = False) -> Path:
    """(T, H, W, 3) uint8 RGB frames to an H.264 file: yuv420p as most videos are, or exactly
    (``lossless``: RGB at qp 0, libx264rgb) for tests that compare decoders pixel for pixel."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264rgb" if lossless else "libx264", rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "rgb24" if lossless else "yuv420p"
        stream.options = {"qp": "0"} if lossless else {"crf": "18"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
