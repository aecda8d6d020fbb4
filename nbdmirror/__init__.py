"""nbdmirror: a live disk-mirroring NBD proxy.

nbdkit serves the guest's disk through plugin/nbdmirror.py, which hands every
request to this package.  While the guest runs, a copier thread copies the
disk to an NBD target, a dirty bitmap records every guest write, and a QMP
control socket lets management complete (pivot) or cancel the job.

Module map:
  sizes      parse "64K"-style sizes and rates
  options    the option table shared by the plugin, `serve` and drive-mirror
  bitmap     the dirty bitmap (thread-safe, O(1) dirty count)
  jobstate   the job state machine and QEMU's verb table; no I/O
  endpoints  raw-file and NBD endpoints behind one small interface
  extents    source/target block status: zero, data, allocation depth
  guest      the guest I/O path: gate, routing, dirty marking
  copier     the background copy loop (aio, bounded in-flight bytes)
  job        a mirror job: ties state machine, copier and events together
  qmp        the QMP control server
  proxy      one served disk: guest path + job + control socket
  cli        the `nbdmirror` command
"""

__version__ = "0.1.0"
