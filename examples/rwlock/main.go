// Command rwlock shows a readers-writer lock: readers sharing it, a writer
// getting in past a steady stream of overlapping readers (once it waits, new
// readers queue behind it), a downgrade from writing to reading, the refused
// upgrade, and a crashed reader freeing its share when its lease runs out.
//
//	go run ./examples/rwlock              # embedded miniredis
//	REDIS_ADDR=localhost:6379 go run ./examples/rwlock
package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/demo"
)

func main() {
	rdb, done := demo.Redis()
	defer done()
	ctx := context.Background()

	client := redlatch.New(rdb)
	defer client.Close()
	const name = "rwlock-demo:catalog"

	// Four readers take overlapping 50ms read holds in a loop.
	var reads atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			r := client.RWMutex(name)
			time.Sleep(time.Duration(i) * 12 * time.Millisecond)
			for {
				select {
				case <-stop:
					return
				default:
				}
				if err := r.RLock(ctx); err != nil {
					log.Fatal(err)
				}
				reads.Add(1)
				time.Sleep(50 * time.Millisecond)
				if err := r.RUnlock(ctx); err != nil {
					log.Fatal(err)
				}
			}
		}(i)
	}
	time.Sleep(300 * time.Millisecond)
	fmt.Printf("4 readers share the lock: %d read holds so far\n", reads.Load())

	w := client.RWMutex(name)
	start := time.Now()
	if err := w.Lock(ctx); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("the writer got in after %v (about one read hold), token %d\n",
		time.Since(start).Round(time.Millisecond), w.Token())

	// Downgrade: take the read lock before releasing the write lock, so no
	// other writer can slip in between.
	if err := w.RLock(ctx); err != nil {
		log.Fatal(err)
	}
	if err := w.Unlock(ctx); err != nil {
		log.Fatal(err)
	}
	fmt.Println("downgraded: still reading, the other readers are back in")

	// Upgrade: refused at once, instead of waiting for its own read forever.
	err := w.Lock(ctx)
	fmt.Printf("a reader asking for the write lock: %v (ErrUpgrade: %v)\n", err, errors.Is(err, redlatch.ErrUpgrade))
	if err := w.RUnlock(ctx); err != nil {
		log.Fatal(err)
	}
	close(stop)
	wg.Wait()

	// A reader that crashes (never unlocks) frees its share after its lease.
	crashed := client.RWMutex(name, redlatch.WithLease(500*time.Millisecond))
	if err := crashed.RLock(ctx); err != nil {
		log.Fatal(err)
	}
	start = time.Now()
	if err := w.Lock(ctx); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("a reader with a 500ms lease never unlocked; the writer got in after %v\n",
		time.Since(start).Round(10*time.Millisecond))
	if err := w.Unlock(ctx); err != nil {
		log.Fatal(err)
	}
	locked, _ := w.IsLocked(ctx)
	fmt.Println("locked at the end:", locked)
}
