package redistest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

const (
	// startTimeout bounds how long a redis-server may take to answer.
	startTimeout = 5 * time.Second
	// startAttempts is how many fresh ports a new server tries: another
	// process may take a port between freePort and redis-server's bind.
	startAttempts = 5
	// logName is the file, in the server's directory, that receives its
	// stdout and stderr.
	logName = "server.log"
)

// Server is one redis-server process listening on 127.0.0.1, on a free
// port, with no persistence (--save "" --appendonly no) and its own
// temporary directory. It runs with Pdeathsig=SIGKILL, so it dies with the
// test binary even when the binary is killed.
//
// (Pdeathsig fires when the OS thread that started the process exits. The
// Go runtime only retires a thread when a goroutine exits while locked to it
// with runtime.LockOSThread, so do not create servers from such goroutines.)
//
// A Server's methods are safe for concurrent use.
type Server struct {
	// Addr is "127.0.0.1:port". It stays the same across Kill and Start.
	Addr string

	args   []string // redis-server's arguments, the same for every Start
	dir    string   // working directory: --dir, the log and nodes.conf
	ownDir bool     // Close removes dir

	mu     sync.Mutex
	cmd    *exec.Cmd     // the running process; nil when not running
	done   chan struct{} // closed once cmd has been reaped
	closed bool
}

// NewServer starts a redis-server dedicated to one test and stops it (for
// good) in t.Cleanup. extraArgs are appended to redis-server's command line,
// e.g. "--replicaof", "127.0.0.1", "6379".
//
// When redis-server is missing NewServer skips the test, or fails it when
// REDLATCH_REQUIRE_REDIS=1.
func NewServer(t testing.TB, extraArgs ...string) *Server {
	t.Helper()
	needServer(t)
	s, err := newServer(false, extraArgs...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

// newServer starts a redis-server on a free port in a new temporary
// directory, retrying on fresh ports when it fails to come up. A cluster
// node also gets cluster mode, its nodes.conf in its directory, and a free
// cluster bus port (port+10000).
func newServer(cluster bool, extraArgs ...string) (*Server, error) {
	dir, err := newDir()
	if err != nil {
		return nil, err
	}
	var errs []error
	for attempt := 0; attempt < startAttempts; attempt++ {
		port, err := freePort(cluster)
		if err != nil {
			errs = append(errs, err)
			break
		}
		p := strconv.Itoa(port)
		s := &Server{Addr: "127.0.0.1:" + p, dir: dir, ownDir: true}
		s.args = []string{
			"--port", p, "--bind", "127.0.0.1",
			"--save", "", "--appendonly", "no",
			"--dir", dir, "--protected-mode", "no",
			// A replica's full sync starts at once, not after 5s (Redis
			// 7's default): AddReplica's master, for one. extraArgs may
			// set it again.
			"--repl-diskless-sync-delay", "0",
		}
		if cluster {
			s.args = append(s.args,
				"--cluster-enabled", "yes",
				"--cluster-config-file", filepath.Join(dir, "nodes.conf"),
				"--cluster-node-timeout", "2000",
				// Without it a node learns its own IP from its peers'
				// packets, and until then CLUSTER SLOTS reports it with
				// an empty host.
				"--cluster-announce-ip", "127.0.0.1",
			)
		}
		s.args = append(s.args, extraArgs...)
		err = s.start()
		if err == nil {
			return s, nil
		}
		errs = append(errs, err)
		_ = os.Remove(filepath.Join(dir, "nodes.conf")) // written before the bus port is bound
		if !errors.Is(err, errPortTaken) {
			break // not a race for the port: another attempt would fail the same way
		}
	}
	_ = os.RemoveAll(dir)
	return nil, errors.Join(errs...)
}

// newDir makes a new server directory, "redlatch-redis-<pid>-<random>" in
// the temporary directory, after removing (once per binary) those of dead
// test binaries. Every process redistest starts, sentinels too, works in
// such a directory.
func newDir() (string, error) {
	sweepOnce.Do(sweepStale)
	dir, err := os.MkdirTemp("", "redlatch-redis-"+strconv.Itoa(os.Getpid())+"-")
	if err != nil {
		return "", fmt.Errorf("redistest: %w", err)
	}
	return dir, nil
}

var sweepOnce sync.Once

// sweepStale removes the directories of test binaries that died without
// cleaning up (a panic, -timeout, a kill): Pdeathsig killed their servers,
// but nothing removed their directories. A directory is named after the
// pid of the binary that made it, "redlatch-redis-<pid>-<random>".
func sweepStale() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "redlatch-redis-*-*"))
	for _, d := range dirs {
		f := strings.Split(filepath.Base(d), "-")
		pid, err := strconv.Atoi(f[2])
		if len(f) != 4 || err != nil || pid == os.Getpid() {
			continue
		}
		if errors.Is(syscall.Kill(pid, 0), syscall.ESRCH) {
			_ = os.RemoveAll(d)
		}
	}
}

// errPortTaken marks a start that failed because another process had taken
// the port (or the cluster bus port) in the meantime.
var errPortTaken = errors.New("port taken")

// freePort returns a TCP port that is free on 127.0.0.1 at the time of the
// call; with bus, port+10000 (a cluster node's bus port) is free too.
func freePort(bus bool) (int, error) {
	for i := 0; i < 100; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, fmt.Errorf("redistest: free port: %w", err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		_ = l.Close()
		if !bus {
			return port, nil
		}
		if port+10000 > 65535 {
			continue
		}
		b, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port+10000))
		if err != nil {
			continue
		}
		_ = b.Close()
		return port, nil
	}
	return 0, errors.New("redistest: no free port pair (port, port+10000) found")
}

// start runs redis-server with s.args and waits until it answers. Its
// output is appended to the log in s.dir and quoted in the error when it
// does not come up.
func (s *Server) start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return fmt.Errorf("redistest: server %s was closed", s.Addr)
	}
	if s.cmd != nil {
		return fmt.Errorf("redistest: server %s is already running", s.Addr)
	}
	logPath := filepath.Join(s.dir, logName)
	log, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("redistest: %w", err)
	}
	var offset int64
	if fi, err := log.Stat(); err == nil {
		offset = fi.Size()
	}
	cmd := exec.Command(serverBinary(), s.args...)
	cmd.Dir = s.dir
	cmd.Stdout, cmd.Stderr = log, log // an *os.File: no copying goroutines
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	err = cmd.Start()
	_ = log.Close() // the child has its own descriptor
	if err != nil {
		return fmt.Errorf("redistest: start %s: %w", serverBinary(), err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	s.cmd, s.done = cmd, done
	if err := waitReady(s.Addr, cmd, done); err != nil {
		s.killLocked()
		output := readFrom(logPath, offset)
		if strings.Contains(output, "already in use") {
			err = fmt.Errorf("%w: %v", errPortTaken, err)
		}
		return fmt.Errorf("redistest: %s %s did not come up on %s: %w\n--- server output ---\n%s",
			serverBinary(), quoteArgs(s.args), s.Addr, err, output)
	}
	return nil
}

// waitReady polls addr until the process cmd answers there, for up to
// startTimeout. It checks the answering process's id so that it cannot
// mistake another server that took the port for this one.
func waitReady(addr string, cmd *exec.Cmd, done <-chan struct{}) error {
	deadline := time.Now().Add(startTimeout)
	for {
		select {
		case <-done:
			return fmt.Errorf("exited: %v", cmd.ProcessState)
		default:
		}
		pid, err := serverPID(addr)
		if err == nil && pid == cmd.Process.Pid {
			return nil
		}
		if err == nil {
			err = fmt.Errorf("%w: answered by another process (pid %d)", errPortTaken, pid)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no answer after %v: %w", startTimeout, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// serverPID asks the Redis at addr for INFO server and returns its
// process_id. It speaks RESP directly, so that polling a server that is not
// up yet neither logs dial errors nor leaves go-redis goroutines behind.
func serverPID(addr string) (int, error) {
	c, err := net.DialTimeout("tcp", addr, 250*time.Millisecond)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	if _, err := io.WriteString(c, "*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n"); err != nil {
		return 0, err
	}
	r := bufio.NewReader(c)
	head, err := r.ReadString('\n')
	if err != nil {
		return 0, err
	}
	if !strings.HasPrefix(head, "$") {
		return 0, fmt.Errorf("INFO: %q", strings.TrimSpace(head))
	}
	n, err := strconv.Atoi(strings.TrimSpace(head[1:]))
	if err != nil || n < 0 {
		return 0, fmt.Errorf("INFO: bad reply %q", strings.TrimSpace(head))
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(body), "\r\n") {
		if v, ok := strings.CutPrefix(line, "process_id:"); ok {
			return strconv.Atoi(v)
		}
	}
	return 0, errors.New("INFO server has no process_id")
}

// quoteArgs joins args for a message, quoting the empty ones.
func quoteArgs(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		q[i] = a
		if a == "" || strings.ContainsAny(a, " \t\"") {
			q[i] = strconv.Quote(a)
		}
	}
	return strings.Join(q, " ")
}

// readFrom returns the file at path from offset on (at most its last 8KiB).
func readFrom(path string, offset int64) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	if offset > int64(len(b)) {
		offset = 0
	}
	b = b[offset:]
	if len(b) > 8<<10 {
		b = b[len(b)-8<<10:]
	}
	return string(b)
}

// Log returns everything the server wrote to stdout and stderr so far,
// across restarts.
func (s *Server) Log() string { return readFrom(filepath.Join(s.dir, logName), 0) }

// Options returns client options for the server: context deadlines are
// honoured on the socket (ContextTimeoutEnabled), dialing gives up after 1s
// and reads and writes after 2s.
func (s *Server) Options() *redis.Options {
	return &redis.Options{
		Addr:                  s.Addr,
		ContextTimeoutEnabled: true,
		DialTimeout:           time.Second,
		ReadTimeout:           2 * time.Second,
		WriteTimeout:          2 * time.Second,
	}
}

// Client returns a new client of the server, from Options, closed in
// t.Cleanup.
func (s *Server) Client(t testing.TB) *redis.Client {
	t.Helper()
	rdb := redis.NewClient(s.Options())
	t.Cleanup(func() { _ = rdb.Close() })
	return rdb
}

// BusyFor keeps the server busy with another client's Lua script for d,
// and returns once the server answers BUSY (start it with a
// busy-reply-threshold below d, e.g. "--busy-reply-threshold", "50"): every
// command but a few is refused meanwhile. The channel delivers the
// script's error when it ends.
func (s *Server) BusyFor(t testing.TB, d time.Duration) <-chan error {
	t.Helper()
	busy := make(chan error, 1)
	rdb := s.Client(t)
	go func() {
		busy <- rdb.Eval(context.Background(), `
local s = redis.call('TIME')
while true do
  local t = redis.call('TIME')
  if (t[1] - s[1]) * 1000000 + (t[2] - s[2]) > tonumber(ARGV[1]) then return 1 end
end`, nil, d.Microseconds()).Err()
	}()
	probe := s.Client(t)
	deadline := time.Now().Add(2 * time.Second)
	for {
		err := probe.Ping(context.Background()).Err()
		if err != nil && strings.HasPrefix(err.Error(), "BUSY") {
			return busy
		}
		if time.Now().After(deadline) {
			t.Fatalf("redistest: server %s never busy (last ping: %v)", s.Addr, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// PID returns the process id of the running server, or 0 when it is not
// running (after Kill or Close).
func (s *Server) PID() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return 0
	}
	return s.cmd.Process.Pid
}

// signal sends sig to the running server; it fails t when there is none.
func (s *Server) signal(t testing.TB, sig syscall.Signal) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		t.Fatalf("redistest: %v to server %s, which is not running", sig, s.Addr)
	}
	if err := s.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("redistest: %v to server %s: %v", sig, s.Addr, err)
	}
}

// Stop freezes the server with SIGSTOP: its connections stay open and the
// kernel still accepts new ones, but nothing is answered until Cont, so
// commands run into their deadlines.
func (s *Server) Stop(t testing.TB) {
	t.Helper()
	s.signal(t, syscall.SIGSTOP)
}

// Cont resumes a server frozen by Stop (SIGCONT). Commands sent meanwhile
// are then answered.
func (s *Server) Cont(t testing.TB) {
	t.Helper()
	s.signal(t, syscall.SIGCONT)
}

// Kill kills the server with SIGKILL (a frozen one too) and waits until it
// has exited. Its data is gone; clients see connection errors until Start.
// Killing a server that is not running does nothing.
func (s *Server) Kill(t testing.TB) {
	t.Helper()
	s.kill()
}

func (s *Server) kill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.killLocked()
}

func (s *Server) killLocked() {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Kill()
	<-s.done
	s.cmd, s.done = nil, nil
}

// Start starts the server again after Kill: same port, same arguments,
// empty data (a cluster node keeps its nodes.conf, so it rejoins with its
// identity and slots). It returns once the server answers, and fails t when
// it does not within 5s, or when the server is running or closed.
func (s *Server) Start(t testing.TB) {
	t.Helper()
	if err := s.start(); err != nil {
		t.Fatal(err)
	}
}

// Restart kills and starts the server: a crash and restart without
// persistence, so all data is lost.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.Kill(t)
	s.Start(t)
}

// Close stops the server for good and removes its directory. It is
// idempotent; NewServer's cleanup and Main call it.
func (s *Server) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.killLocked()
	if !s.closed && s.ownDir {
		_ = os.RemoveAll(s.dir)
	}
	s.closed = true
}
