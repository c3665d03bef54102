"""bench/profile.op_times on the trace layouts XLA writes: events shaped as jax.profiler.ProfileData's
(planes -> lines -> events with name, duration_ns and (name, value) stats), laid out as a trace
from XLA:CPU, from a GPU replaying CUDA graphs (seen on an H200, jax 0.11.2) and from a TPU."""

from types import SimpleNamespace as NS

from klip_jax.bench import profile


def _event(name, ns, **stats):
  return NS(name=name, duration_ns=ns, stats=list(stats.items()))


def _trace(*planes):
  return NS(planes=[NS(name=name, lines=[NS(name=line, events=events) for line, events in lines])
                    for name, lines in planes])


def test_cpu_ops_are_the_events_that_name_an_hlo_op():
  trace = _trace(("/device:CUSTOM:Megascale Trace", []), ("/host:CPU", [
      ("tf_XLAPjRtCpuClient/1", [_event("ynn_fusion.3", 40, hlo_op="ynn_fusion.3"),
                                 _event("ThreadpoolListener::StartRegion", 999)]),
      ("tf_XLAEigen/2", [_event("ThunkExecutor::Execute", 500),  # a span around ops, not an op
                         _event("ynn_fusion.17", 60, hlo_op="ynn_fusion.17"),
                         _event("broadcast_divide_fusion", 5, hlo_op="broadcast_divide_fusion")]),
      ("python", [_event("$profiler.py:307 trace", 10_000)])]))
  assert profile.op_times(trace) == {"ynn_fusion": 100, "broadcast_divide_fusion": 5}


def test_gpu_kernels_count_once_by_their_own_names():
  # Inside a CUDA graph every kernel's hlo_op is the graph's command_buffer_N; the kernel's
  # name says what ran. Host events that carry an hlo_op (launches) must not count again.
  trace = _trace(
      ("/host:CPU", [("Host Threads/1", [_event("launch", 7, hlo_op="command_buffer_9")])]),
      ("/device:GPU:0", [
          ("Stream #14(Compute)", [_event("gemm_fusion_dot_12", 30, hlo_op="command_buffer_9"),
                                   _event("gemm_fusion_dot.4", 20, hlo_op="command_buffer_9"),
                                   _event("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", 11, hlo_op="command_buffer_9"),
                                   _event("loop_add_fusion", 4, hlo_op="loop_add_fusion")]),
          ("Stream #15(MemcpyH2D)", [_event("MemcpyH2D", 100)])]))  # input transfer, no op
  assert profile.op_times(trace) == {"gemm_fusion_dot": 50, "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT": 11,
                                     "loop_add_fusion": 4}


def test_tpu_ops_line_is_read_alone():
  trace = _trace(("/device:TPU:0", [("XLA Modules", [_event("jit_train_step(1)", 90)]),
                                    ("XLA Ops", [_event("fusion.1", 30), _event("fusion.2", 20),
                                                 _event("convolution.5", 40)])]))
  assert profile.op_times(trace) == {"fusion": 50, "convolution": 40}


def test_top_ops_are_per_call_with_shares(monkeypatch):
  trace = _trace(("/host:CPU", [("tf_XLAEigen/1", [_event("a.1", 3_000_000, hlo_op="a.1"),
                                                  _event("b.2", 1_000_000, hlo_op="b.2")])]))
  monkeypatch.setattr(profile.jax.profiler.ProfileData, "from_file", lambda path: trace)
  assert profile.top_ops("trace.xplane.pb", calls=2) == [
      {"op": "a", "ms_per_step": 1.5, "share": 0.75}, {"op": "b", "ms_per_step": 0.5, "share": 0.25}]
