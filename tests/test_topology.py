"""TPU slice names -> topologies, HBM and meshes; the device tests need libtpu (the tpu extra), not a TPU."""
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from varedit_jax import sharding, topology


@pytest.mark.parametrize("name,topology_name,chips,hbm_gib", [
    ("v5p-8", "v5p:2x2x1", 4, 95), ("v5p-16", "v5p:2x2x2", 8, 95), ("v5p-128", "v5p:4x4x4", 64, 95),
    ("v5p-256", "v5p:4x4x8", 128, 95), ("v4-8", "v4:2x2x1", 4, 32), ("v4-32", "v4:2x2x4", 16, 32),
    ("v5e-1", "v5e:1x1", 1, 16), ("v5e-16", "v5e:4x4", 16, 16), ("v5e-256", "v5e:16x16", 256, 16),
    ("v6e-8", "v6e:2x4", 8, 32)])
def test_slice_spec(name, topology_name, chips, hbm_gib):
    spec = topology.slice_spec(name)
    assert (spec.topology_name, spec.chips, spec.hbm_bytes) == (topology_name, chips, hbm_gib * 2**30)


@pytest.mark.parametrize("name", ["v3-8", "v5p", "v5p-12", "v5p-4", "v5e-2", "v5e-512", "v6e-8x", "tpu-8"])
def test_slice_spec_rejects_unknown(name):
    with pytest.raises(ValueError, match="unknown"):
        topology.slice_spec(name)


@pytest.fixture(scope="module")
def libtpu():
    pytest.importorskip("libtpu", reason="TPU topologies need libtpu (the tpu extra)")


@pytest.mark.parametrize("name,kind", [("v5p-8", "TPU v5"), ("v4-8", "TPU v4"), ("v5e-16", "TPU v5 lite"),
                                       ("v6e-8", "TPU v6 lite")])
def test_topology_devices(libtpu, name, kind):
    devices = topology.topology_devices(name)
    assert len(devices) == topology.slice_spec(name).chips
    assert {d.device_kind for d in devices} == {kind}


def test_make_mesh(libtpu):
    mesh = topology.make_mesh("v5p-128", fsdp=-1, tensor=4)
    assert dict(mesh.shape) == {"dcn": 1, "data": 1, "fsdp": 16, "tensor": 4}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 4
    assert len(set(mesh.devices.flat)) == 64
    assert dict(topology.make_mesh("v4-32", data=2, fsdp=2, tensor=-1).shape) == {"dcn": 1, "data": 2, "fsdp": 2,
                                                                                  "tensor": 4}
    with pytest.raises(ValueError, match="do not divide"):
        topology.make_mesh("v5p-8", data=3)
    with pytest.raises(ValueError, match="need 8 devices"):
        topology.make_mesh("v5p-8", data=2, fsdp=2, tensor=2)
    with pytest.raises(ValueError, match="at most one -1"):
        topology.make_mesh("v5p-8", fsdp=-1, tensor=-1)
    cpu = topology.make_mesh(jax.devices()[:8], data=2, fsdp=-1, tensor=2)  # explicit devices work too
    assert dict(cpu.shape) == {"dcn": 1, "data": 2, "fsdp": 2, "tensor": 2}


def test_aot_compile_on_multihost_slice(libtpu):
    """A sharded matmul compiles for v5p-128 (16 hosts) and reports per-device memory."""
    mesh = topology.make_mesh("v5p-128", fsdp=-1, tensor=4)
    x = jax.ShapeDtypeStruct((64, 1024), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp", None)))
    w = jax.ShapeDtypeStruct((1024, 2048), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "tensor")))
    compiled = jax.jit(lambda x, w: x @ w).lower(x, w).compile()
    assert compiled.memory_analysis().output_size_in_bytes == 64 // 16 * 2048 // 4 * 2


def test_a_multi_slice_mesh_puts_dcn_over_the_slices(libtpu):
    """Two v5p-8 slices as one topology: the devices carry slice_index; "dcn" separates the slices (the hybrid mesh),
    data / fsdp / tensor lie within one. A mesh that miscounts the slices is refused."""
    devices = topology.topology_devices("v5p-8", 2)
    mesh = topology.make_mesh("v5p-8", fsdp=-1, slices=2)
    assert dict(mesh.shape) == {"dcn": 2, "data": 1, "fsdp": 4, "tensor": 1}
    assert [{d.slice_index for d in mesh.devices[i].flat} for i in range(2)] == [{0}, {1}]
    assert set(mesh.devices.flat) == set(devices)
    with pytest.raises(ValueError, match="span 2 slice"):
        topology.make_mesh(devices, fsdp=-1)
    with pytest.raises(ValueError, match="slices must be >= 1"):
        topology.topology_devices("v5p-8", 0)


def test_simulated_slices_are_consecutive_device_groups():
    """CPU devices have no slice_index: slices = consecutive groups of the given devices (each a slice's ICI grid)."""
    devices = jax.devices()[:8]
    mesh = topology.make_mesh(devices, data=1, fsdp=-1, tensor=2, slices=2)
    assert dict(mesh.shape) == {"dcn": 2, "data": 1, "fsdp": 2, "tensor": 2}
    assert [sorted(d.id for d in mesh.devices[i].flat) for i in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert sharding.batch_axes(mesh, 8) == ("dcn", "data", "fsdp")  # the batch splits over the slices too
    no_dcn = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    assert sharding.batch_axes(no_dcn, 8) == ("data", "fsdp")  # an axis a mesh lacks counts as size 1
    with pytest.raises(ValueError, match="do not split into 3 slices"):
        topology.make_mesh(devices, slices=3)
    with pytest.raises(ValueError, match="need 8 devices, the slice has 4"):
        topology.make_mesh(devices, data=2, fsdp=2, tensor=2, slices=2)
