# Evaluates a Vagrantfile against a recorder instead of Vagrant, and prints what it set as
# JSON: tests/unit/test_vagrantfile.py checks it (no Vagrant, no KVM on this machine).
require "json"

class Recorder
  attr_reader :calls

  def initialize(path = [])
    @path = path
    @calls = []
    @children = {}
  end

  def method_missing(name, *args, **kwargs, &block)
    key = name.to_s
    if key.end_with?("=")
      $settings[(@path + [key.chomp("=")]).join(".")] = args.first
      return args.first
    end
    if block
      child = Recorder.new(@path + [key, args.first.to_s])
      block.call(child)
      $calls << { "call" => (@path + [key]).join("."), "args" => args, "kwargs" => kwargs }
      return child
    end
    if args.empty? && kwargs.empty?
      return (@children[key] ||= Recorder.new(@path + [key]))
    end
    $calls << { "call" => (@path + [key]).join("."), "args" => args, "kwargs" => kwargs }
    nil
  end

  def respond_to_missing?(*) = true
end

module Vagrant
  def self.configure(version)
    $version = version
    yield Recorder.new
  end
end

$settings = {}
$calls = []
load ARGV.fetch(0)
puts JSON.generate({ "version" => $version, "settings" => $settings, "calls" => $calls })
