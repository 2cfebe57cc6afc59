import time, torch, numpy as np
torch.set_num_threads(2)
def bench(f, n=15):
  f(); t=[]
  for _ in range(n):
    t0=time.perf_counter(); f(); t.append(time.perf_counter()-t0)
  return 1e3*np.median(t)
cl = torch.channels_last
x = torch.randn(64,192,32,32).contiguous(memory_format=cl); w1 = torch.randn(48,192,1,1)
y = torch.randn(64,48,32,32).contiguous(memory_format=cl); w3 = torch.randn(12,48,3,3).contiguous(memory_format=cl)
dy = torch.randn(64,12,32,32).contiguous(memory_format=cl)
F = torch.nn.functional
with torch.no_grad():
  print("1x1 conv fwd  %.2f ms" % bench(lambda: F.conv2d(x, w1)))
  print("3x3 conv fwd  %.2f ms" % bench(lambda: F.conv2d(y, w3, padding=1)))
  print("3x3 wgrad     %.2f ms" % bench(lambda: torch.ops.aten.convolution_backward(dy, y, w3, None, [1,1], [1,1], [1,1], False, [0,0], 1, [False, False, True])))
  print("3x3 dgrad     %.2f ms" % bench(lambda: torch.ops.aten.convolution_backward(dy, y, w3, None, [1,1], [1,1], [1,1], False, [0,0], 1, [True, False, False])))
  print("reduce        %.2f ms" % bench(lambda: x.mean((0,2,3))))
  print("bn-relu       %.2f ms" % bench(lambda: F.relu(F.batch_norm(x, None, None, torch.ones(192), torch.zeros(192), training=True))))
  g1 = torch.randn(64,48,32,32).contiguous(memory_format=cl)
  print("1x1 dgrad     %.2f ms" % bench(lambda: torch.ops.aten.convolution_backward(g1, x, w1, None, [1,1], [0,0], [1,1], False, [0,0], 1, [True, False, False])))
  print("1x1 wgrad     %.2f ms" % bench(lambda: torch.ops.aten.convolution_backward(g1, x, w1, None, [1,1], [0,0], [1,1], False, [0,0], 1, [False, False, True])))
