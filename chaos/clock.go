package chaos

import "golang.org/x/sys/unix"

// Mono returns CLOCK_MONOTONIC in nanoseconds. Unlike the monotonic reading
// of time.Now, which the Go runtime counts from the start of each process,
// it is one clock for every process of the machine, so the holds reported by
// worker processes and by the test process can be compared.
func Mono() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		panic(err) // cannot fail on Linux with a valid clock id
	}
	return ts.Nano()
}
