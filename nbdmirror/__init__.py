"""nbdmirror: a live disk-mirroring NBD proxy.

nbdkit serves the guest's disk through this package's nbdkit_plugin.py
(from a checkout also as plugin/nbdmirror.py), which hands every request to
the package.  While the guest runs, a copier copies the disk to an NBD
target, a dirty bitmap records every guest write, and a QMP control socket
lets management complete (pivot) or cancel the job.

Module map:
  sizes          parse "64K"-style sizes and rates
  options        the option table: serve flags, plugin keys, drive-mirror
                 arguments and JobOptions all come from it
  paths          the files the proxy creates (sockets, pid file): checked,
                 never replacing what is not ours
  bitmap         the dirty bitmap (thread-safe, O(1) dirty count)
  chunklocks     who may write a chunk on the target now
  jobstate       the job state machine and QEMU's verb table; no I/O
  endpoints      raw-file and NBD endpoints behind one small interface
  extents        source/target block status: zero, data, allocation depth
  guest          the guest I/O path: gate, routing, dirty marking
  ratelimit      token bucket for `speed`
  copier         the background copy loop (aio, bounded in-flight bytes)
  job            a mirror job: ties state machine, copier and events together
  qmp            the QMP control server: framing, greeting, events
  control        the QMP commands
  proxy          one served disk: guest path + job + control socket
  nbdkit_plugin  the nbdkit plugin: callbacks that delegate to proxy/guest
  cli            the `nbdmirror` command
  demo           the README's demo
"""

__version__ = "0.1.0"
