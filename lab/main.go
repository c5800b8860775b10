// Command tailbox-lab runs the pieces of tailbox's local tailnet lab that are not tailscaled itself:
//
//	tailbox-lab control   Tailscale's own test control server plus DERP and STUN, on loopback
//	tailbox-lab devhost   the dev host's services: an HTTP server and a git smart-HTTP server
//
// Each subcommand binds loopback ports the kernel picks, then prints exactly one JSON line on
// stdout describing where it listens, and serves until stdin reaches EOF (its parent died or let
// go of it), SIGINT or SIGTERM. Logs go to stderr. The lab in testkit/src/lab.rs drives both.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix("tailbox-lab: ")
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "control":
		err = runControl(os.Args[2:])
	case "devhost":
		err = runDevhost(os.Args[2:])
	case "-h", "-help", "--help", "help":
		usage()
	default:
		fmt.Fprintf(os.Stderr, "tailbox-lab: unknown subcommand %q\n", os.Args[1])
		usage()
	}
	if err != nil {
		log.Printf("error: %v", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprint(os.Stderr, `usage: tailbox-lab <subcommand> [flags]

subcommands:
  control   test control server + DERP + STUN on 127.0.0.1 (see: tailbox-lab control -h)
  devhost   HTTP + git smart-HTTP servers on 127.0.0.1 (see: tailbox-lab devhost -h)

Each prints one JSON line on stdout once it is serving, and exits when stdin reaches EOF.
`)
	os.Exit(2)
}

// announce prints the single machine-readable line the parent waits for.
func announce(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(os.Stdout, "%s\n", b)
	return err
}

// serveOrDie serves h on ln until ln is closed. A server that fails on its own ends the process,
// which the parent sees as a dead lab program rather than a half-working lab.
func serveOrDie(name string, ln net.Listener, h http.Handler) {
	if err := http.Serve(ln, h); !errors.Is(err, net.ErrClosed) {
		log.Fatalf("%s server: %v", name, err)
	}
}

// waitForShutdown blocks until the parent lets go of our stdin (including by dying) or a
// termination signal arrives. Tying our lifetime to a pipe means nothing outlives the test that
// started it, even when that test is SIGKILLed.
func waitForShutdown() string {
	done := make(chan string, 2)
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		done <- "stdin closed"
	}()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		s := <-sigs
		done <- "got " + s.String()
	}()
	return <-done
}
