package redistest

import (
	"net"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Sentinel is one redis-sentinel process monitoring a master as "mymaster".
type Sentinel struct {
	Addr       string
	MasterName string
	srv        *Server
}

// NewSentinel starts a sentinel on 127.0.0.1 monitoring master (quorum 1,
// down after 1s), stopped at the end of the test.
func NewSentinel(t testing.TB, master *Server) *Sentinel {
	t.Helper()
	needServer(t)
	// Not t.TempDir: a directory named by newDir is removed by a later run
	// when this test binary dies without its cleanups (-timeout, a kill).
	dir, err := newDir()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	host, port, _ := net.SplitHostPort(master.Addr)
	conf := dir + "/sentinel.conf"
	body := "sentinel monitor mymaster " + host + " " + port + " 1\n" +
		"sentinel down-after-milliseconds mymaster 1000\n" +
		"sentinel failover-timeout mymaster 5000\n"
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	var last error
	for attempt := 0; attempt < 5; attempt++ {
		p, err := freePort(false)
		if err != nil {
			t.Fatal(err)
		}
		s := &Server{Addr: "127.0.0.1:" + strconv.Itoa(p), dir: dir,
			args: []string{conf, "--sentinel", "--port", strconv.Itoa(p), "--bind", "127.0.0.1", "--dir", dir}}
		if last = s.start(); last == nil {
			t.Cleanup(s.kill)
			return &Sentinel{Addr: s.Addr, MasterName: "mymaster", srv: s}
		}
	}
	t.Fatal(last)
	return nil
}

// FailoverClient returns a sentinel-backed client for the monitored master,
// closed at the end of the test.
func (s *Sentinel) FailoverClient(t testing.TB) *redis.Client {
	rdb := redis.NewFailoverClient(&redis.FailoverOptions{
		MasterName: s.MasterName, SentinelAddrs: []string{s.Addr},
		ContextTimeoutEnabled: true, DialTimeout: time.Second,
		ReadTimeout: 2 * time.Second, WriteTimeout: 2 * time.Second,
	})
	t.Cleanup(func() { _ = rdb.Close() })
	return rdb
}
