"""An interactive editing page over `editor.Editor` (Gradio, the `demo` extra).

  python -m varedit_jax.demo --checkpoint CKPT [--image-tokenizer TOK] [--text-encoder DIR] \
      [--host 127.0.0.1] [--port 7860] [--tensor N]

The page: upload an image, type an instruction, choose resolution / guidance / tau / seed, press Edit; the edit and
its time appear. Each edit continues from the current image (multi-turn); the history shows every turn, and "Back"
(or clicking a turn) steps back to it. Bad input (no image, an empty instruction, a file that is not an image) is
a message on the page; the server keeps serving.

Batching: Gradio's queue hands the edit function up to `Editor.batch_size` (the data-parallel size) waiting
requests at once; they are edited in one `Editor.edit` call per (resolution, guidance, tau) among them. A request's
seed s is its sample index (key `fold_in(key(0), s)`), so its edit does not depend on what it was batched with.
Images travel as PNG files (lossless: a later turn edits exactly the pixels shown). Nothing is fetched from
outside the server: analytics off (no telemetry, no version check), system fonts, no share link.
"""
import argparse
import dataclasses
import os
import pathlib
import sys
import tempfile
import time

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no version check
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

from varedit_jax import editor as editor_lib, images, sampler, schedules, state_dicts  # noqa: E402

NO_IMAGE = "Upload an image first."
NO_INSTRUCTION = "Type an instruction."


def _gradio():
    try:
        import gradio as gr
    except ImportError as e:
        raise ImportError("the demo needs the demo extra: pip install 'varedit_jax[demo]'") from e
    return gr


@dataclasses.dataclass(frozen=True)
class Request:
    """One edit asked for on the page (error: why its image could not be read)."""
    image: np.ndarray | None  # uint8 (H, W, 3)
    instruction: str
    resolution: int | None
    guidance: float
    tau: float
    seed: int
    error: str | None = None

    def problem(self) -> str | None:
        if self.error or self.image is None:
            return self.error or NO_IMAGE
        if not (self.instruction or "").strip():
            return NO_INSTRUCTION
        return None


def read_image(path: str | None) -> tuple[np.ndarray | None, str | None]:
    """(uint8 image, None), (None, why it is not an image), or (None, None) without a file."""
    if not path:
        return None, None
    try:
        return images.read(path), None
    except (ValueError, FileNotFoundError):
        return None, f"Not an image: {os.path.basename(path)} cannot be read as one."


def edit_requests(ed: editor_lib.Editor, requests: list[Request]) -> list[tuple[np.ndarray | None, str]]:
    """(edited image or None, message) per request: the valid ones in one `Editor.edit` call per (resolution,
    guidance, tau); an invalid request or a failed call is a message, never an exception."""
    results: list = [(None, r.problem()) for r in requests]
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        if r.problem() is None:
            groups.setdefault((r.resolution, float(r.guidance), float(r.tau)), []).append(i)
    for (resolution, guidance, tau), members in groups.items():
        t0 = time.perf_counter()
        try:
            out = ed.edit([requests[i].image for i in members], [requests[i].instruction for i in members],
                          sampler.SamplingOptions(guidance=guidance, tau=tau, seed=0), resolution=resolution,
                          indices=[int(requests[i].seed) for i in members])
        except (ValueError, FloatingPointError, RuntimeError) as e:
            for i in members:
                results[i] = (None, f"Edit failed: {e}")
            continue
        took = time.perf_counter() - t0
        for i, image in zip(members, out):
            results[i] = (image, f"Edited in {took:.2f} s (batch of {len(members)}).")
    return results


def resolution_choices(ed: editor_lib.Editor) -> tuple[list[tuple[str, int]], int | None]:
    """(dropdown choices (label, resolution), the default: the checkpoint's size class)."""
    choices = []
    for resolution, pn in schedules.RESOLUTION_TO_PN.items():
        h, w = schedules.pixel_size(ed.schedule("1.0", resolution), ed.stride)
        choices.append((f"{resolution} ({pn}: model canvas {w}x{h})", resolution))
    default = next((r for r, pn in schedules.RESOLUTION_TO_PN.items() if pn == ed.config.get("pn")), choices[0][1])
    return choices, default


def save_png(image: np.ndarray, folder: str) -> str:
    """An image as FOLDER/<pixel hash>.png (written once, atomically): what the page shows and reads back, losslessly
    (Gradio copies such files into its cache once; it rewrites the arrays it encodes itself, racing the browser)."""
    path = os.path.join(folder, images.pixel_hash(image)[:32] + ".png")
    if not os.path.exists(path):
        state_dicts.atomic_write(path, lambda tmp: pathlib.Path(tmp).write_bytes(images.png_bytes(image)))
    return path


def _gallery(history: list[str]) -> list:
    return [(path, "source" if t == 0 else f"turn {t}") for t, path in enumerate(history)]


def build(ed: editor_lib.Editor):
    """The page (a `gr.Blocks`, queued) over an Editor. Images travel as PNG files (see `save_png`); the history is
    the session's list of them (source first)."""
    gr = _gradio()
    choices, default = resolution_choices(ed)
    folder = tempfile.mkdtemp(prefix="varedit_demo_")

    def load_upload(path):
        """An uploaded file -> (current image, history, gallery, edit, message); not an image: a message."""
        image, error = read_image(path)
        if image is None:
            return None, [], [], None, error or ""
        image = save_png(image, folder)
        return image, [image], _gallery([image]), None, ""

    def edit_batch(current, instructions, resolutions, guidances, taus, seeds):
        """Lists (one entry per queued request) in, lists out; one request's bad input never fails the others."""
        requests = []
        for path, text, res, g, tau, seed in zip(current, instructions, resolutions, guidances, taus, seeds):
            image, error = read_image(path)
            requests.append(Request(image, text, res, g, tau, int(seed or 0), error))
        out = edit_requests(ed, requests)
        return [None if im is None else save_png(im, folder) for im, _ in out], [message for _, message in out]

    def push(history, edited):
        if edited is None or not history:
            return history, _gallery(history), gr.update()
        history = history + [edited]
        return history, _gallery(history), edited

    def back(history, to: int | None = None):
        history = history[:max(1, len(history) - 1) if to is None else to + 1]
        return history, _gallery(history), history[-1] if history else None

    def select(history, event: gr.SelectData):
        return back(history, int(event.index))

    with gr.Blocks(analytics_enabled=False, title="VAREdit") as page:
        gr.Markdown("## VAREdit: instruction-guided editing")
        history = gr.State([])
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Upload an image", file_types=["image"], type="filepath", elem_id="upload")
                current = gr.Image(label="Current image (the next edit starts here)", type="filepath", height=280,
                                   interactive=False, elem_id="current")
                instruction = gr.Textbox(label="Instruction", placeholder="make the circle blue",
                                         elem_id="instruction")
                with gr.Row():
                    resolution = gr.Dropdown(choices, value=default, label="Resolution", elem_id="resolution")
                    seed = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id="seed")
                guidance = gr.Slider(1.0, 10.0, sampler.DEFAULT_GUIDANCE, step=0.5, label="Guidance")
                tau = gr.Slider(0.05, 1.0, sampler.DEFAULT_TAU, step=0.05, label="Tau")
                with gr.Row():
                    edit_button = gr.Button("Edit", variant="primary", elem_id="edit")
                    back_button = gr.Button("Back", elem_id="back")
            with gr.Column():
                edited = gr.Image(label="Edit", type="filepath", height=280, interactive=False, elem_id="edited")
                message = gr.Markdown(elem_id="message")
                gallery = gr.Gallery(label="History (click a turn to step back to it)", columns=6,
                                     elem_id="history")
        upload.change(load_upload, upload, [current, history, gallery, edited, message])
        edit_button.click(edit_batch, [current, instruction, resolution, guidance, tau, seed], [edited, message],
                          batch=True, max_batch_size=ed.batch_size, concurrency_limit=1,
                          show_progress_on=[edited]).then(push, [history, edited], [history, gallery, current])
        back_button.click(back, history, [history, gallery, current])
        gallery.select(select, history, [history, gallery, current])
    return page.queue(default_concurrency_limit=1)


def serve(ed: editor_lib.Editor, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True):
    """Builds the page and serves it on host:port (returns the running page when `block` is False)."""
    gr = _gradio()
    page = build(ed)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # system fonts: nothing fetched
    css = "#current img, #edited img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}"
    page.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block,
                quiet=not block, theme=theme, css=css, footer_links=[], ssr_mode=False, pwa=False, mcp_server=False)
    return page


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m varedit_jax.demo", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="transformer checkpoint / workdir / official weights")
    p.add_argument("--image-tokenizer", help="image tokenizer (default: the checkpoint config's)")
    p.add_argument("--text-encoder", help="text encoder (default: the checkpoint config's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--tensor", type=int, default=1, help="devices per model replica (8B)")
    args = p.parse_args(argv)
    try:
        _gradio()
        ed = editor_lib.Editor.from_checkpoint(args.checkpoint, args.image_tokenizer, args.text_encoder,
                                               tensor=args.tensor)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"serving {args.checkpoint} on http://{args.host}:{args.port} (batches of up to {ed.batch_size})",
          flush=True)
    serve(ed, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
