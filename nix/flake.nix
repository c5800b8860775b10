{
  description = "tailbox: put a sandbox on your tailnet and prove it reaches your dev host";

  # Pinned in flake.lock (see README.md for where the revision came from).
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixpkgs-unstable";

  outputs =
    { self, nixpkgs }:
    let
      workspace = import ./workspace.nix;
      inherit (nixpkgs) lib;
      systems = builtins.attrNames workspace.rustTargets;
      forAllSystems = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});

      # Only what cargo needs: every workspace member (xtask and testkit are members too) and
      # the manifests, so a change to docs or the lab does not rebuild the binaries.
      src = lib.fileset.toSource {
        root = workspace.root;
        fileset = lib.fileset.unions [
          (workspace.root + "/Cargo.toml")
          workspace.cargoLock
          (workspace.root + "/.cargo")
          (workspace.root + "/proto")
          (workspace.root + "/localapi")
          (workspace.root + "/agent")
          (workspace.root + "/controller")
          (workspace.root + "/testkit")
          (workspace.root + "/xtask")
        ];
      };

      # A static (musl) build of one workspace binary. pkgsStatic's Rust targets the musl
      # triple of the system and links C code (libgit2, mimalloc, ring) statically, so the
      # result needs no loader: the Nix image has none at the FHS path.
      staticBinary =
        system: pkgs: member: description:
        let
          static = pkgs.pkgsStatic;
          target = static.stdenv.hostPlatform.rust.rustcTarget;
        in
        assert lib.assertMsg (target == workspace.rustTargets.${system})
          "nixpkgs builds ${target} for ${system}, but the agent ships as ${workspace.rustTargets.${system}}";
        static.rustPlatform.buildRustPackage {
          pname = member.crate;
          inherit (workspace) version;
          inherit src;
          cargoLock.lockFile = workspace.cargoLock;
          cargoBuildFlags = [
            "--package"
            member.crate
            "--bin"
            member.bin
          ];
          # The tests need the local tailnet lab (Go-built tailscaled, network namespaces):
          # `scripts/test` runs them outside Nix.
          doCheck = false;
          meta = {
            inherit description;
            mainProgram = member.bin;
            license = with lib.licenses; [
              mit
              asl20
            ];
            platforms = systems;
          };
        };

      # cook's sandbox image: tailscale, the agent, CA certificates, git, coreutils and bash,
      # with PATH and SSL_CERT_FILE set. `sidecar = true` starts `tailbox-agent sidecar` as the
      # image's command; it is off by default because the sidecar subcommand is still being
      # built, and an image must not start a command its agent does not have.
      mkSandboxImage =
        {
          pkgs,
          agent,
          sidecar ? false,
        }:
        pkgs.dockerTools.buildLayeredImage {
          name = "tailbox-sandbox";
          tag = workspace.version;
          contents = [
            pkgs.tailscale
            agent
            pkgs.cacert
            pkgs.gitMinimal
            pkgs.coreutils
            pkgs.bashInteractive
          ];
          config = {
            Env = [
              # buildLayeredImage links every package's bin/ into /bin.
              "PATH=/bin"
              "SSL_CERT_FILE=${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt"
            ];
            Cmd = if sidecar then [ "/bin/${workspace.agent.bin}" "sidecar" ] else [ "/bin/bash" ];
          };
        };
    in
    {
      packages = forAllSystems (
        system: pkgs:
        let
          tailbox = staticBinary system pkgs workspace.controller "The tailbox CLI (controller)";
          tailbox-agent = staticBinary system pkgs workspace.agent "The static in-sandbox tailbox agent";
        in
        {
          inherit tailbox tailbox-agent;
          sandbox-image = mkSandboxImage {
            inherit pkgs;
            agent = tailbox-agent;
          };
          default = tailbox;
        }
      );

      apps = forAllSystems (
        system: _: {
          tailbox = {
            type = "app";
            program = lib.getExe self.packages.${system}.tailbox;
          };
          default = self.apps.${system}.tailbox;
        }
      );

      devShells = forAllSystems (
        system: pkgs: {
          # The tools scripts/setup installs on Debian. Rust comes from nixpkgs here; the musl
          # targets the static builds need are what `nix build .#tailbox-agent` is for.
          default = pkgs.mkShell {
            packages = with pkgs; [
              cargo
              rustc
              clippy
              rustfmt
              go
              git
              curl
              file
              python3
              cargo-zigbuild
              zig
              qemu
              nix
            ];
          };
        }
      );

      # For images with other options, e.g. `mkSandboxImage { inherit pkgs; agent = …; sidecar = true; }`
      # once `tailbox-agent sidecar` exists.
      lib = {
        inherit mkSandboxImage;
      };
    };
}
