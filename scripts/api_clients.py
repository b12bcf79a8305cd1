#!/usr/bin/env python3
"""Drives `sdgen serve` with real API clients from PyPI: the `webuiapi`
package (AUTOMATIC1111's API, as Open WebUI-era scripts use it) and the
`openai` package (images API). Starts the server on a free loopback port
with the tiny SD 1.x fixture, checks each call, stops the server with
SIGTERM; exits non-zero on the first failure. `.ci/run` installs both
packages into a cached venv and runs this.

Usage: api_clients.py SDGEN_BINARY
"""
import base64
import io
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import webuiapi
from openai import OpenAI
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def start(binary):
    proc = subprocess.Popen(
        [binary, "serve", "--port", "0", "--device", "cpu", "--offline",
         "--model", str(FIXTURES / "tiny-sd1"), "--models-dir", str(FIXTURES), "--out-dir", "/tmp/sdgen-clients-out"],
        stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            # Keep reading the log so that the server never blocks on it.
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, int(m.group(1))
    raise SystemExit("the server did not start")


def check(what, ok):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        raise SystemExit(1)


def main():
    proc, port = start(sys.argv[1])
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=3)
        titles = api.util_get_model_names()
        check(f"get_sd_models lists the fixtures ({len(titles)})", any(t.startswith("tiny-sd1") for t in titles))
        # By exact title: webuiapi's closest-name match ties "tiny-sd1" with "tiny-sd2 [9118741361]".
        title = next(t for t in titles if t.startswith("tiny-sd1 ["))
        api.util_set_model(title)
        check("util_set_model", api.util_get_current_model() == title)
        r = api.txt2img(prompt="a red fox", seed=7, width=64, height=64, steps=3)
        check("txt2img gives a 64x64 image", r.image.size == (64, 64))
        check("txt2img info has the seed", r.info["seed"] == 7 and r.info["all_seeds"] == [7])
        hr = api.txt2img(prompt="a red fox", seed=7, width=64, height=64, steps=3, enable_hr=True, hr_scale=1.5,
                         hr_upscaler=webuiapi.HiResUpscaler.LatentBicubic, hr_second_pass_steps=2,
                         denoising_strength=0.6)
        check("txt2img with enable_hr gives the hires size", hr.image.size == (96, 96))
        check("the hires image records A1111's keys", "Hires upscaler: Latent (bicubic)" in hr.info["infotexts"][0])
        hr = api.txt2img(prompt="a red fox", seed=7, width=64, height=64, steps=3, enable_hr=True,
                         hr_upscaler=webuiapi.HiResUpscaler.Lanczos, hr_second_pass_steps=1)
        check("enable_hr with the Lanczos upscaler doubles the size", hr.image.size == (128, 128))
        check("get_upscalers lists Lanczos", "Lanczos" in [u["name"] for u in api.get_upscalers()])
        check("get_latent_upscale_modes lists A1111's six",
              [m["name"] for m in api.get_latent_upscale_modes()][:2] == ["Latent", "Latent (antialiased)"])
        info = api.png_info(r.image)
        check("png_info reads the parameters", "Seed: 7" in str(info.info))
        r2 = api.img2img(images=[r.image], prompt="a red fox", seed=7, width=64, height=64, steps=4,
                         denoising_strength=0.5)
        check("img2img gives a 64x64 image", r2.image.size == (64, 64))
        # Inpainting with webuiapi's defaults: only the masked region, at the
        # request's size, pasted back into the 64x64 original.
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 40, 40))
        r3 = api.img2img(images=[r.image], mask_image=mask, prompt="a red fox", seed=7, width=32, height=32, steps=4,
                         denoising_strength=0.8)
        original, inpainted = r.image.convert("RGB"), r3.image.convert("RGB")
        check("masked img2img keeps the original's size", inpainted.size == (64, 64))
        check("masked img2img keeps the unmasked pixels", original.getpixel((2, 2)) == inpainted.getpixel((2, 2))
              and original.getpixel((60, 60)) == inpainted.getpixel((60, 60)))
        check("masked img2img repaints the masked area", original.crop((20, 20, 36, 36)) != inpainted.crop((20, 20, 36, 36)))
        check("get_samplers names A1111's samplers", "DPM++ 2M" in [s["name"] for s in api.get_samplers()])
        check("get_loras answers a list", isinstance(api.get_loras(), list))
        progress = api.get_progress()
        check("get_progress when idle", progress["progress"] == 0 and progress["state"]["job_count"] == 0)
        # Interrupt a long job from another thread: it still answers, with its image.
        results = {}
        worker = threading.Thread(target=lambda: results.update(
            long=api.txt2img(prompt="a red fox", seed=1, width=16, height=16, steps=1000)))
        worker.start()
        for _ in range(600):
            if api.get_progress()["state"]["sampling_step"] > 0 or not worker.is_alive():
                break
            time.sleep(0.05)
        check("the long job is sampling", worker.is_alive())
        api.interrupt()
        worker.join()
        check("interrupt returns the image made so far", results["long"].image.size == (16, 16))

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        out = client.images.generate(model="tiny-sd1", prompt="a red fox", n=1, size="64x64",
                                     response_format="b64_json")
        image = Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json)))
        check("openai images.generate gives a 64x64 PNG", image.size == (64, 64))
        check("openai models.list", any(m.id == "tiny-sd1" for m in client.models.list()))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    check("the server exits 0 on SIGTERM", code == 0)


if __name__ == "__main__":
    main()
