"""Sharded initialization and loading on 8 simulated devices (fsdp 8) with a model of >= 256 MB: during the random
init, `init_checkpoint` loading (official safetensors and an orbax checkpoint) and the first step, no device holds
more than 1.1x its share of params + optimizer state + EMA plus 16 MiB (live arrays; the compiled init's and the
compiled first step's own memory analysis); host memory while reading official weights grows by at most 1.5x the
largest tensor + 64 MiB beyond the arrays it produces. Run in a fresh process (live arrays and RSS of that process
only)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import REPO_ROOT

SCRIPT = textwrap.dedent('''
    import gc, json, os, sys, threading
    sys.path.insert(0, "tests")
    import jax, numpy as np
    from helpers import small_config
    from varedit_jax import assets, checkpoint, configlib, loading, state_dicts
    from varedit_jax import trainer as trainer_lib
    from varedit_jax.convert import infinity as convert_infinity

    MiB = 2 ** 20
    workdir = sys.argv[1]
    config = assets.resolve(small_config(**{"model.embed_dim": 1024, "model.mlp_dim": 4096, "model.depth": 4,
                                           "model.num_heads": 8, "mesh.shape": (1, -1, 1), "optim.ema_decay": 0.999}))
    image_tok, text_encoder, text_tokenizer = loading.load_frozen(config)
    config.data.stride = image_tok.stride
    trainer = trainer_lib.Trainer(config, trainer_lib.make_mesh(config), image_tok, text_encoder)
    n = jax.device_count()
    state_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(trainer.abstract_state()))
    share = state_bytes / n
    frozen_states = trainer.place_frozen(image_tok, text_encoder)
    baseline = {d: 0 for d in jax.devices()}

    def per_device():
        """Bytes of live device buffers per device (gc first; a buffer seen through several arrays counts once)."""
        gc.collect()
        out, seen = dict(baseline), set()
        for a in jax.live_arrays():
            for s in a.addressable_shards:
                key = (s.device, s.data.unsafe_buffer_pointer())
                if key not in seen:
                    seen.add(key)
                    out[s.device] += s.data.nbytes
        return out

    before = per_device()  # the frozen models and whatever setup placed: not part of the state's share
    def check(what):
        used = {d: b - before[d] for d, b in per_device().items()}
        worst = max(used.values())
        report[what] = worst / MiB
        assert worst <= 1.1 * share + 16 * MiB, f"{what}: a device holds {worst / MiB:.1f} MiB > 1.1 x {share / MiB:.1f} MiB + 16"

    report = {"state_mib": state_bytes / MiB, "share_mib": share / MiB}
    compiled = trainer.init_params_fn().lower().compile()
    mem = compiled.memory_analysis()
    report["init_program_mib"] = (mem.temp_size_in_bytes + mem.output_size_in_bytes) / MiB
    assert mem.temp_size_in_bytes + mem.output_size_in_bytes <= 1.1 * share + 16 * MiB, report
    params = compiled()
    check("random init")
    full = jax.tree.map(np.asarray, params)  # a host copy to write the official file and the checkpoint from
    sd = convert_infinity.export_weights(config, full)
    largest = max(v.nbytes for v in sd.values())
    state_dicts.write_state_dict(os.path.join(workdir, "w.safetensors"), sd)
    checkpoint.save_params(os.path.join(workdir, "ck"), full, config)
    del sd, full
    gc.collect()
    report["params_mib"] = sum(a.nbytes for a in jax.tree.leaves(params)) / MiB

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    for form, path in (("official", "w.safetensors"), ("checkpoint", "ck")):
        peak, stop = [rss()], threading.Event()
        def sample():
            while not stop.wait(0.002):
                peak.append(rss())
        start = peak[0]
        t = threading.Thread(target=sample); t.start()
        loaded = loading.load_init_params(configlib.override(config, {"init_checkpoint": os.path.join(workdir, path)}), params)
        stop.set(); t.join()
        fresh = [a for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)) if a is not b]
        produced = sum(s.data.nbytes for a in fresh for s in a.addressable_shards)
        growth = max(peak) - start - produced
        report[f"{form}_host_growth_mib"] = growth / MiB
        if form == "official":
            report["largest_tensor_mib"] = largest / MiB
            assert growth <= 1.5 * largest + 64 * MiB, report
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        check(f"{form} init_checkpoint loaded")
        del loaded, fresh
        gc.collect()
    state = trainer.init_state(params)
    del params
    check("train state")
    # The first step, compiled for these shardings (running a 268 MB model's step on 8 simulated devices would take
    # minutes of CPU): its state arguments and outputs (donated) are each device's share; XLA's temporaries (the
    # layers' gathered weights, activations) come and go within the step.
    frozen_bytes = sum(s.data.nbytes for a in jax.tree.leaves(frozen_states) for s in a.addressable_shards[:1])
    batch = trainer.batch_spec("1.0")
    batch_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(batch)) / n
    with jax.set_mesh(trainer.mesh):
        step = trainer.step_fn("1.0").lower(state, frozen_states, batch).compile().memory_analysis()
    report["step_arguments_mib"] = (step.argument_size_in_bytes - frozen_bytes - batch_bytes) / MiB
    report["step_outputs_mib"] = step.output_size_in_bytes / MiB
    report["step_temporaries_mib"] = step.temp_size_in_bytes / MiB
    for what in ("step_arguments_mib", "step_outputs_mib"):
        assert report[what] <= (1.1 * share + 16 * MiB) / MiB, report
    print("REPORT " + json.dumps(report))
''')


@pytest.mark.slow
def test_no_device_holds_more_than_its_share_and_host_memory_stays_small(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=1200, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    report = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and report, proc.stdout[-3000:] + proc.stderr[-3000:]
    numbers = json.loads(report[0][len("REPORT "):])
    print(numbers)
    assert numbers["params_mib"] >= 256
